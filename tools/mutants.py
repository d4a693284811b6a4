"""A hand-made mutation pass over dfkd's guards and refusals: break each one on purpose and check that a test fails.

Run from the repository root, with the Python that has dfkd's dev extras::

    python tools/mutants.py            # every mutant
    python tools/mutants.py E07 G04    # some of them
    python tools/mutants.py --list     # what each one breaks, without running anything

Each mutant replaces a piece of text (found exactly once) in one file under src/, runs the tests named beside it
(``pytest -x``, with ``src`` first on PYTHONPATH and no bytecode written), and puts the file back byte for byte. The
report is a Markdown table: the test that caught the mutant, ``SURVIVED``, or, for a mutant marked equivalent (one
that changes no behaviour), why it survives. Exit status 1 when one survived that is not marked equivalent, or one could
not be judged (its text is no longer in the file: update the list). A pass killed outright (SIGKILL) cannot put the file
back: ``git diff src`` shows it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # under src/dfkd
    what: str  # the behaviour it breaks, in one line
    edits: tuple[tuple[str, str], ...]  # (text found exactly once, its replacement)
    tests: tuple[str, ...]  # pytest arguments: the tests that should catch it
    equivalent: str = ""  # why no test can catch it (the behaviour does not change), for a mutant expected to survive


def m(
    name: str, path: str, what: str, old: str, new: str, *tests: str, more: tuple = (), equivalent: str = ""
) -> Mutant:
    return Mutant(name, path, what, ((old, new), *more), tests, equivalent)


GUARD = ("tests/test_guard.py",)
SAFETY = ("tests/test_safety.py",)
EXPORT = ("tests/test_export.py",)
DATAFREE_EXPORT = ("tests/test_datafree.py::test_data_free_run_end_to_end_and_resume",)
FULL_DISK = (
    "tests/test_faults.py::test_a_full_disk_while_exporting_keeps_the_earlier_export",
    "tests/test_faults.py::test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_last_one",
)
TRUST_CHECK = '_require_trust(spec, f"loads the TorchScript program {path}", keys, trust_code)\n    '
PY_TRUST = '    _require_trust(spec, f"imports {module_name} and calls {attr}()", keys, trust_code)\n'

MUTANTS = [
    # -- engine/guard.py: the collapse signals ----------------------------------------------------------------------
    m("G01", "engine/guard.py", "a teacher with 90 % of its answers in one class counts as informative",
      "    if float(teacher_shares.max()) >= ONE_CLASS_SHARE:\n        return False\n", "", *GUARD),
    m("G02", "engine/guard.py", "the teacher's one-class bar: 'under 90 %' becomes 'at most 90 %'",
      "if float(teacher_shares.max()) >= ONE_CLASS_SHARE:", "if float(teacher_shares.max()) > ONE_CLASS_SHARE:",
      *GUARD),
    m("G03", "engine/guard.py", "the teacher's labels are ignored (a teacher at chance on them counts as informative)",
      "    if labels is None:\n        return True\n", "    return True\n", *GUARD),
    m("G04", "engine/guard.py", "the teacher's kappa bar 0.05 raised to 0.5", "TEACHER_KAPPA_MIN = 0.05",
      "TEACHER_KAPPA_MIN = 0.5", *GUARD),
    m("G05", "engine/guard.py", "the student's kappa bar 0.02 raised to 0.2 (a slowly learning student is flagged)",
      "KAPPA_MIN = 0.02", "KAPPA_MIN = 0.2", *GUARD),
    m("G06", "engine/guard.py", "MIN_STEPS: judged from step MIN_STEPS + 1", "judged = student_steps >= MIN_STEPS",
      "judged = student_steps > MIN_STEPS", *GUARD),
    m("G07", "engine/guard.py", "MIN_STEPS 100 lowered to 1 (a smoke run's fresh student is judged)",
      "MIN_STEPS = 100", "MIN_STEPS = 1", *GUARD),
    m("G08", "engine/guard.py", "the zero-loss signal never fires", "abs(student_loss) < ZERO_LOSS",
      "abs(student_loss) < 0", *GUARD),
    m("G09", "engine/guard.py", "the student's one-class bar: 'at least 90 %' becomes 'over 90 %'",
      "top_share >= ONE_CLASS_SHARE", "top_share > ONE_CLASS_SHARE", *GUARD),
    m("G10", "engine/guard.py", "the one-class signal ignores that the teacher itself answers one class",
      "top_share >= ONE_CLASS_SHARE and float(teacher_shares.max()) < ONE_CLASS_SHARE",
      "top_share >= ONE_CLASS_SHARE", *GUARD),
    m("G11", "engine/guard.py", "chance agreement taken as 1/k, whatever the class balance",
      "return float((student_shares * teacher_shares).sum() * 100.0)", "return 100.0 / len(student_shares)",
      *GUARD),
    m("G12", "engine/guard.py", "kappa is 0, not 1, when chance agreement is 100 %",
      "return 1.0 if chance >= 100.0", "return 0.0 if chance >= 100.0", *GUARD,
      equivalent="chance is 100 % only when the teacher puts every image in one class, and such a teacher is "
      "not informative: neither signal that reads kappa can fire"),
    # -- engine/distill.py and config.py: the guard's wiring, the time limit, trust never saved ---------------------
    m("D01", "engine/distill.py", "the run's status ignores the guard (never collapsed)",
      'status, reason = guard.status(state["epoch"])', "status, reason = guard.status(-1)", *GUARD),
    m("D02", "engine/distill.py", "the guard is not told the student's steps (every epoch judged)",
      'losses.get("train/loss"), prog.step', 'losses.get("train/loss")', *GUARD),
    m("D03", "engine/distill.py", "each rank decides engine.time_limit by its own clock",
      'env.main_decides(timers["total_seconds"] >= limit)', 'timers["total_seconds"] >= limit',
      "tests/test_ddp.py::test_rank_0s_clock_decides_the_time_limit_for_every_rank"),
    m("D04", "config.py", "trust_code is saved with the run (config.yaml, checkpoints)",
      'if not f.metadata.get("per_run")', "", "tests/test_safety.py::test_trust_is_not_saved_with_the_run"),
    m("D05", "config.py", "a recipe or a run's config.yaml may grant trust_code",
      'if "trust_code" in data:', "if False:", "tests/test_safety.py::test_a_file_cannot_grant_trust"),
    # -- models/sources.py: code-executing sources ------------------------------------------------------------------
    m("S01", "models/sources.py", "every trust check passes", "    if not trust_code:\n        raise ConfigError(",
      "    if False:\n        raise ConfigError(", *SAFETY),
    m("S02", "models/sources.py", "a local hub folder's hubconf.py runs without trust",
      '_require_trust(spec, f"runs {local', '(spec, f"runs {local', *SAFETY),
    m("S03", "models/sources.py", "a GitHub hub repository is fetched and run without trust",
      '_require_trust(spec, f"downloads {github_repo}', '(spec, f"downloads {github_repo}', *SAFETY),
    m("S04", "models/sources.py", "torch.hub is not given the user's trust (trust_repo left to torch's default)",
      ', source="github", trust_repo=trust_code)', ', source="github")', *SAFETY),
    m("S05", "models/sources.py", "hub:OWNER/REPO without the github: prefix is fetched from GitHub",
      "elif repo.startswith(_GITHUB) and _GITHUB_REPO.fullmatch(repo[len(_GITHUB) :]):",
      "elif _GITHUB_REPO.fullmatch(repo.removeprefix(_GITHUB)):", *SAFETY,
      more=(("github_repo = repo[len(_GITHUB) :]", "github_repo = repo.removeprefix(_GITHUB)"),)),
    m("S06", "models/sources.py", "a spec without github: always takes the local branch (no hint for a missing folder)",
      "if local.is_dir():  #", "if not repo.startswith(_GITHUB):  #", *SAFETY),
    m("S07", "models/sources.py", "a py: module is imported before the trust check",
      PY_TRUST, "", *SAFETY, more=(("    factory: Any = module\n", PY_TRUST + "    factory: Any = module\n"),)),
    m("S08", "models/sources.py", "a TorchScript file is loaded before the trust check",
      TRUST_CHECK + 'return torch.jit.load(str(path), map_location="cpu"), TeacherMeta(source=spec)',
      'net = torch.jit.load(str(path), map_location="cpu")\n    '
      + TRUST_CHECK + "return net, TeacherMeta(source=spec)",
      *SAFETY),
    m("S09", "models/loading.py", "build_network trusts code by default",
      "    trust_code: bool = False,\n) -> nn.Module:", "    trust_code: bool = True,\n) -> nn.Module:", *SAFETY),
    m("S10", "models/sources.py", "torch.hub is always told to trust a GitHub repository",
      ', source="github", trust_repo=trust_code)', ', source="github", trust_repo=True)', *SAFETY,
      equivalent="the trust check on the line above has refused the spec unless trust_code is true"),
    # -- engine/export.py, models/exported.py: failed runs, trust, the sha256, the default checkpoint, whole writes -
    m("E01", "engine/export.py", "a failed run is exported without --force",
      "if status in FAILED_STATUSES and not force:", "if False:", *EXPORT),
    m("E02", "engine/export.py", "only a collapsed run needs --force (a diverged one does not)",
      "if status in FAILED_STATUSES and not force:", 'if status == "collapsed" and not force:', *EXPORT),
    m("E03", "engine/export.py", "the card does not carry the run's status", '"run_status": status,',
      '"run_status": STATUS_OK,', *EXPORT),
    m("E04", "models/exported.py", "load_student does not warn about a failed run's card",
      'if card.get("run_status") in FAILED_STATUSES:', "if False:", *EXPORT),
    m("E05", "models/exported.py", "load_student loads a TorchScript export without trust",
      "        if not trust_code:\n            raise ConfigError(", "        if False:\n            raise ConfigError(",
      *EXPORT),
    m("E06", "models/exported.py", "the sha256 on the card is not checked", 'if digest != card["weights"]["sha256"]:',
      "if False:", *EXPORT),
    m("E07", "models/exported.py", "sha256_file hashes only the first MiB",
      'for block in iter(lambda: f.read(1 << 20), b""):\n            digest.update(block)',
      "digest.update(f.read(1 << 20))", *EXPORT),
    m("E08", "engine/export.py", "the default --which is best whenever a best.pt exists, even one the test set chose",
      '"best" if split in SPLITS_NOT_TEST and run.best.is_file() else "last"',
      '"best" if run.best.is_file() else "last"', *EXPORT),
    m("E09", "engine/export.py", "the default --which is best only for runs scored on val, not on held-out images",
      "if split in SPLITS_NOT_TEST and run.best.is_file()", 'if split == "val" and run.best.is_file()', *EXPORT),
    m("E10", "engine/export.py", "an interrupted data.name=none run counts as scored on the test set",
      "    if (cfg.get(\"data\") or {}).get(\"name\") == NO_DATA:\n        return HELDOUT_SPLIT\n", "",
      *DATAFREE_EXPORT),
    m("E11", "engine/export.py", "an interrupted run's card ignores how its checkpoint says best was chosen",
      'summary.get("selected_by") or ckpt.get("selected_by")', 'summary.get("selected_by")', *DATAFREE_EXPORT),
    m("E12", "engine/export.py", "the weights and the card replace the earlier export one at a time",
      "write_atomically({weights_path: weights, card_path: (json.dumps(card, indent=2) + \"\\n\").encode()}, kept)",
      "write_atomically({weights_path: weights}, kept)\n"
      "    write_atomically({card_path: (json.dumps(card, indent=2) + \"\\n\").encode()}, kept)", *FULL_DISK),
    m("E13", "engine/rundir.py", "write_atomically writes in place (no temporary file)",
      'tmp = path.with_name(path.name + ".tmp")', "tmp = path", *FULL_DISK),
    m("E14", "engine/rundir.py", "write_atomically renames each file as soon as it is written (not all or none)",
      "                os.fsync(f.fileno())\n",
      "                os.fsync(f.fileno())\n            os.replace(tmp, path)\n", *FULL_DISK,
      more=(("        for path, tmp in zip(files, staged):\n            os.replace(tmp, path)\n", ""),)),
    # -- commands/cli.py: exit statuses -----------------------------------------------------------------------------
    m("C01", "commands/cli.py", "a failed run (RunFailedError) exits 2 like bad input",
      "        return 1\n    except DfkdError", "        return 2\n    except DfkdError",
      "tests/test_cli.py::test_divergence_through_the_cli"),
    m("C02", "commands/cli.py", "a failed download (DownloadError) exits 2 like bad input",
      "except (RunFailedError, DownloadError) as exc:", "except RunFailedError as exc:",
      "tests/test_download.py::test_cli"),
    m("C03", "commands/cli.py", "Ctrl-C exits 1", "        return 130", "        return 1",
      "tests/test_cli.py::test_every_command_exits_2_on_bad_input_and_130_when_interrupted"),
    m("C04", "commands/cli.py", "a collapsed distill run exits 0", "        _write(failure)\n        return 1",
      "        _write(failure)\n        return 0",
      "tests/test_guard.py::test_a_starved_student_of_a_two_class_teacher_without_data_is_collapsed"),
    m("C05", "commands/bench.py", "a suite with a collapsed (not diverged) run exits 0",
      'if s.get("status", "ok") != "ok"]', 'if s.get("status", "ok") == "diverged"]',
      "tests/test_guard.py::test_bench_with_seeds_marks_a_collapsed_cell"),
    m("C06", "commands/cli.py", "a table suite holding a failed run exits 0",
      "    return 1 if failed else 0\n\n\ndef cmd_data", "    return 0\n\n\ndef cmd_data",
      "tests/test_tables.py::test_a_queue_over_devices_runs_every_cell_and_a_failed_cell_stops_nothing"),
]  # fmt: skip

_FAILED = re.compile(r"^(FAILED|ERROR) (tests/\S+)", re.M)


def run_mutant(mutant: Mutant, timeout: float) -> str:
    """Apply the mutant, run its tests and restore the file; the test that failed, or SURVIVED."""
    path = ROOT / "src" / "dfkd" / mutant.path
    original = path.read_bytes()
    text = original.decode()
    for old, new in mutant.edits:
        if text.count(old) != 1:
            return f"NOT APPLIED: the text to replace is in {mutant.path} {text.count(old)} times, not once"
        text = text.replace(old, new)
    # a stale .pyc of the mutated (or the restored) source must never be imported: none is kept or written
    pyc = Path(importlib.util.cache_from_source(str(path)))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
    try:
        pyc.unlink(missing_ok=True)
        path.write_text(text)
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"caught: the tests ran past {timeout:.0f}s"
    finally:
        path.write_bytes(original)
        pyc.unlink(missing_ok=True)
    if path.read_bytes() != original:
        raise SystemExit(f"{path} was not restored: check it with git diff")
    if proc.returncode == 0:
        return f"survived, equivalent: {mutant.equivalent}" if mutant.equivalent else "SURVIVED"
    found = _FAILED.search(proc.stdout)
    if proc.returncode == 1 and found:
        return f"caught by {found.group(2)}" + (" (an error in its set-up)" if found.group(1) == "ERROR" else "")
    return f"NOT JUDGED: pytest exit status {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and the tests meant to catch them")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed to one mutant's tests")
    args = parser.parse_args(argv)
    known = {mutant.name: mutant for mutant in MUTANTS}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown mutant(s) {', '.join(unknown)}; `--list` shows them")
    chosen = [known[name] for name in args.names] or MUTANTS
    out = sys.stdout
    out.write(f"| mutant | file | what it breaks | {'tests' if args.list else 'result'} |\n|---|---|---|---|\n")
    bad = 0
    for mutant in chosen:
        result = " ".join(mutant.tests) if args.list else run_mutant(mutant, args.timeout)
        bad += not (args.list or result.startswith(("caught", "survived, equivalent")))
        out.write(f"| {mutant.name} | {mutant.path} | {mutant.what} | {result} |\n")
        out.flush()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
