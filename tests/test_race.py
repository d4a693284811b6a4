"""The race's arithmetic: time to a threshold, accuracy at a time, the table and the winner, on hand-made curves."""

from __future__ import annotations

from dfkd.commands.race import accuracy_at, format_race_table, time_to, winner_at

# (wall seconds at the end of an epoch, top-1 of that epoch)
FAST = [(100.0, 60.0), (200.0, 76.0), (300.0, 81.0), (700.0, 79.0)]
SLOW = [(400.0, 50.0), (800.0, 86.0)]


def test_time_to_is_the_first_epoch_at_or_above_the_threshold():
    assert time_to(FAST, 75.0) == 200.0 and time_to(FAST, 81.0) == 300.0
    assert time_to(FAST, 85.0) is None and time_to(SLOW, 85.0) == 800.0 and time_to([], 10.0) is None


def test_accuracy_at_a_time_is_the_last_evaluated_epoch_not_the_best():
    assert accuracy_at(FAST, 50.0) is None
    assert accuracy_at(FAST, 299.0) == 76.0 and accuracy_at(FAST, 300.0) == 81.0
    assert accuracy_at(FAST, 1800.0) == 79.0  # the student held at the end, below the best epoch's 81


def test_the_table_counts_the_seeds_that_reached_each_threshold():
    table = format_race_table({"a": [FAST, SLOW], "b": [SLOW]}, budget=1800.0, thresholds=(75.0, 85.0))
    row_a = next(line for line in table.splitlines() if line.startswith("| a |"))
    # 75 %: seed 1 at 200 s, seed 2 at 800 s -> mean 500 s (2/2); 85 %: only seed 2, at 800 s (1/2)
    assert "8m20s (2/2)" in row_a and "13m20s (1/2)" in row_a
    # at 10 min: seed 1 holds 81 (its 300 s epoch), seed 2 holds 50: 65.50 ± 21.92
    assert "65.50 ± 21.92" in row_a
    row_b = next(line for line in table.splitlines() if line.startswith("| b |"))
    assert row_b.count("13m20s (1/1)") == 2  # its one seed reaches 75 and 85 % in the same epoch
    assert "top-1 at 10 min" in table and "top-1 at 30 min" in table


def test_the_winner_needs_every_seed_evaluated_by_then():
    curves = {"a": [FAST, SLOW], "b": [SLOW]}
    assert winner_at(curves, 600.0) == ("a", 65.5)  # b's 50 is lower
    assert winner_at(curves, 1800.0) == ("b", 86.0)
    assert winner_at(curves, 150.0) is None  # b has no evaluation yet and a's second seed neither
