"""The table layouts (recipes/tables/*.yaml) against the CuDFKD paper's tables (ljrprocc/DataFree README): every
cell has a recipe for its pair, and every recipe's published number is that paper's, so a drifting recipe fails
here."""

from __future__ import annotations

import pytest

from dfkd.config import TABLES_DIR, find_recipe, load_config, read_yaml, recipe_names, recipe_root
from dfkd.methods import METHODS

SEED = "ljrprocc/DataFree@bf3096b:README.md"
NA = None  # the CuDFKD paper prints N\A

# The CuDFKD paper's tables, transcribed once from ljrprocc/DataFree@bf3096b:README.md (rows in its order, columns as in
# the table files' pairs).
PUBLISHED = {
    "cifar10": {
        "T. Scratch": [95.70, 92.25, 94.87, 94.87, 94.87],
        "S. Scratch": [95.20, 95.20, 93.94, 93.95, 91.12],
        "DAFL": [92.22, 81.10, 81.33, 81.55, 72.15],
        "ZSKT": [93.32, 89.46, 86.07, 89.66, 83.74],
        "ADI": [93.26, 90.36, 86.85, 89.72, 83.01],
        "DFQ": [94.61, 90.84, 91.69, 92.01, 86.14],
        "CMI": [94.84, 91.13, 92.78, 92.52, 90.01],
        "PRE-DFKD": [94.10, NA, NA, NA, NA],
        "CuDFKD": [95.28, 91.61, 93.18, 92.98, 88.77],
    },
    "cifar100": {
        "T. Scratch": [78.05, 71.32, 75.83, 75.83],
        "S. Scratch": [77.10, 77.10, 72.19, 73.56],
        "DAFL": [74.47, 57.29, 34.66, 40.00],
        "ZSKT": [67.74, 34.72, 29.73, 28.44],
        "ADI": [61.32, 54.13, 61.33, 61.34],
        "DFQ": [72.06, 68.32, 61.92, 59.01],
        "CMI": [73.75, 70.56, 66.88, 66.07],
        "PRE-DFKD": [77.01, NA, NA, NA],
        "CuDFKD": [75.97, 71.22, 66.74, 66.26],
    },
}
# the CuDFKD paper's cost tables (ResNet-34 -> ResNet-18): mu, sigma^2, best, GPU memory (GB), hours; None for "-"
COST = {
    "cifar10": {
        "DAFL": (62.6, 17.1, 92.0, 6.45, 6.10),
        "DFAD": (86.1, 12.3, 93.3, None, None),
        "ADI": (87.2, 13.9, 93.3, 7.85, 25.2),
        "CMI": (82.4, 16.6, 94.8, 12.5, 13.3),
        "MB-DFKD": (83.3, 16.4, 92.4, None, None),
        "PRE-DFKD": (87.4, 10.3, 94.1, None, None),
        "CuDFKD": (94.1, 2.88, 95.0, 6.84, 5.48),
    },
    "cifar100": {
        "DAFL": (52.5, 12.8, 74.5, 6.45, 7.09),
        "DFAD": (54.9, 12.9, 67.7, None, None),
        "ADI": (51.3, 18.2, 61.3, 7.85, 30.4),
        "CMI": (55.2, 24.1, 77.0, 12.5, 22.3),
        "MB-DFKD": (64.4, 18.3, 75.4, None, None),
        "PRE-DFKD": (70.2, 11.1, 77.1, None, None),
        "CuDFKD": (71.7, 4.37, 75.9, 6.84, 7.50),
    },
}
ARCHS = {"resnet34", "resnet18", "vgg11", "wrn40_2", "wrn40_1", "wrn16_2", "wrn16_1"}


def layout(dataset: str) -> dict:
    return read_yaml(recipe_root() / TABLES_DIR / f"{dataset}.yaml")


def cell_recipe(dataset: str, row: dict, pair: dict) -> str:
    if "kind" in row:
        return f"teachers/{dataset}-{pair[row['kind']]}"
    return f"{dataset}/{row['method']}-{pair['name']}"


def cells(dataset: str):
    table = layout(dataset)
    for row in table["rows"]:
        for column, pair in enumerate(table["pairs"]):
            yield row, pair, PUBLISHED[dataset][row["label"]][column]


def test_the_table_files_are_not_recipes():
    assert not any(name.startswith(f"{TABLES_DIR}/") for name in recipe_names())
    assert {p.stem for p in (recipe_root() / TABLES_DIR).glob("*.yaml")} == set(PUBLISHED)


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_the_layout_is_the_seeds(dataset):
    table = layout(dataset)
    assert table["dataset"] == dataset and table["source"] == SEED == table["cost"]["source"]
    assert [row["label"] for row in table["rows"]] == list(PUBLISHED[dataset])
    assert all(len(numbers) == len(table["pairs"]) for numbers in PUBLISHED[dataset].values())
    for pair in table["pairs"]:
        assert pair["name"] == f"{pair['teacher']}-{pair['student']}" and {pair["teacher"], pair["student"]} <= ARCHS
    for row in table["rows"] + table["extra_rows"]:
        assert ("kind" in row and row["kind"] in ("teacher", "student")) or row["method"] in METHODS.names()
        assert not set(row.get("published", {})) - {pair["name"] for pair in table["pairs"]}


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_every_cell_has_a_recipe_of_its_pair_with_the_seeds_number(dataset):
    names = set(recipe_names())
    for row, pair, number in cells(dataset):
        published_only = row.get("published", {})
        if pair["name"] in published_only:
            assert published_only[pair["name"]] == number, (row["label"], pair["name"])
            continue
        name = cell_recipe(dataset, row, pair)
        assert name in names, f"{row['label']} / {pair['name']}: no recipe {name}"
        expected = read_yaml(find_recipe(name)).get("expected") or {}
        assert expected.get("top1") == number, f"{name}: expected.top1 {expected.get('top1')}, the paper says {number}"
        if number is not None:
            assert expected["source"].startswith(SEED), name
        if "kind" in row:
            cfg = load_config("train-teacher", name)
            assert (cfg.data.name, cfg.model.arch) == (dataset, pair[row["kind"]])
        else:
            cfg = load_config("distill", name)
            assert (cfg.data.name, cfg.method.name) == (dataset, row["method"])
            assert (cfg.teacher.arch, cfg.student.arch) == (pair["teacher"], pair["student"])


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_extra_rows_recipes_load_for_their_pair(dataset):
    table = layout(dataset)
    names = set(recipe_names())
    found = 0
    for row in table["extra_rows"]:
        for pair in table["pairs"]:
            name = cell_recipe(dataset, row, pair)
            if name in names:
                cfg = load_config("distill", name)
                assert (cfg.method.name, cfg.teacher.arch, cfg.student.arch) == (
                    row["method"],
                    pair["teacher"],
                    pair["student"],
                )
                found += 1
    assert found >= 2 * len(table["pairs"])  # DFAD and MB-DFKD on every pair


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_the_cost_table_is_the_seeds(dataset):
    cost = layout(dataset)["cost"]
    assert (cost["pair"], cost["batch_size"]) == ("resnet34-resnet18", 256)
    rows = {row["label"]: row for row in cost["rows"]}
    assert list(rows) == list(COST[dataset])
    for label, numbers in COST[dataset].items():
        row = rows[label]
        assert tuple(row[k] for k in ("mu", "var", "best", "gpu_memory_gb", "hours")) == numbers, label
        assert f"{dataset}/{row['method']}-{cost['pair']}" in recipe_names()
