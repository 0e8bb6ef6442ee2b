"""The extension points: selectors (and their own options), scores and model families registered in one place and
found everywhere, in-process and through entry points of installed distributions; and one-way layers."""

from __future__ import annotations

import ast
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from hf_clipsel.parser import parse_config
from hf_clipsel.scores import SCORES, Column, Score, register_score
from hf_clipsel.selection import SELECTORS, SelectionInputs, register_selector, select
from hf_clipsel.selection.config import SelectionConfig
from tests.conftest import REPO, cli, run_config

PACKAGE = REPO / "hf_clipsel"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of hf_clipsel it imports``, from the AST: imports inside functions and under
    ``TYPE_CHECKING`` count too (a late import hides an edge, it does not remove it)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:  # `from pkg import name` names an object
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name and candidate.startswith("hf_clipsel"):
                    targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle_late_imports_included():
    graph = import_graph()
    assert "hf_clipsel.configs" in graph and graph["hf_clipsel.configs"], "the graph was not built"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_late_import_cycle():
    """The check above can fail: a cycle closed by an import inside a function is found."""
    graph = {"a": {"b"}, "b": set()}
    late = ast.parse(textwrap.dedent("def f():\n    from hf_clipsel import a\n"))
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(late))
    graph["b"].add("a")
    assert find_cycle(graph) == ["a", "b", "a"]


def test_no_module_is_over_450_lines():
    long = {
        path.relative_to(REPO).as_posix(): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 450
    }
    assert not long, long


@dataclass
class StrideOptions:
    stride_offset: int = field(default=0, metadata={"help": "test selector: the first row kept."})


def _stride_selector(inputs, ratios, config):
    """Keeps the first k valid rows from ``stride_offset`` on (a selector with an option of its own)."""
    from hf_clipsel.core.names import budget
    from hf_clipsel.selection import SelectionResult

    result = SelectionResult()
    rows = np.flatnonzero(inputs.valid)
    rows = np.roll(rows, -config.selector_options.stride_offset)
    for ratio in ratios:
        k = budget(ratio, inputs.num_rows)
        mask = np.zeros(inputs.num_rows, dtype=bool)
        mask[rows[:k]] = True
        result.add(ratio, mask, k, rows.size)
    return result


@pytest.fixture
def stride_selector():
    register_selector("test_stride", options=StrideOptions)(_stride_selector)
    try:
        yield
    finally:
        del SELECTORS["test_stride"]


def test_a_selector_with_an_option_of_its_own_from_yaml_and_the_command_line(stride_selector, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("selection_method: test_stride\nstride_offset: 3\nselection_ratios: [0.5]\n")
    from_yaml = parse_config(["--config", str(path)])
    assert from_yaml.selection.selector_options == StrideOptions(stride_offset=3)
    overridden = parse_config(["--config", str(path), "--stride_offset", "5"])
    assert overridden.selection.selector_options.stride_offset == 5
    assert overridden.to_flat()["stride_offset"] == 5
    inputs = SelectionInputs(np.arange(10), np.zeros(10), np.zeros(10), np.zeros(10))
    assert np.flatnonzero(select(inputs, overridden.selection)[0.5]).tolist() == [5, 6, 7, 8, 9]
    # the option belongs to its selector: given with another one, it is refused rather than ignored
    with pytest.raises(ValueError, match="stride_offset is an option of selection_method test_stride"):
        parse_config(["--selection_method", "exact", "--stride_offset", "2"])
    assert "--stride_offset" in _help_of(parse_config)


def _help_of(_parse) -> str:
    from hf_clipsel.parser import build_parser

    return build_parser().format_help()


@pytest.mark.parametrize(
    "returned, message",
    [
        ({}, "selector 'test_bad' returned no mask for ratio 0.3"),
        ({0.3: np.ones(4, dtype=bool)}, "mask of shape (4,) at ratio 0.3; expected bool of shape (10,)"),
        ({0.3: np.ones(10, dtype=bool)}, "selector 'test_bad' selected 10 rows at ratio 0.3; its budget is exactly 3"),
        (None, "selector 'test_bad' returned NoneType"),
    ],
)
def test_what_a_selector_returns_is_checked_and_named(returned, message):
    register_selector("test_bad")(lambda inputs, ratios, config: returned)
    try:
        inputs = SelectionInputs(np.arange(10), np.zeros(10), np.zeros(10), np.zeros(10))
        with pytest.raises(ValueError, match=__import__("re").escape(message)):
            select(inputs, SelectionConfig(selection_ratios=[0.3], selection_method="test_bad"))
    finally:
        del SELECTORS["test_bad"]


def test_registering_under_a_non_string_name_is_refused_at_once():
    with pytest.raises(ValueError, match="non-empty string name, not 123"):
        register_selector(123)(_stride_selector)
    assert 123 not in SELECTORS
    assert SelectionConfig().selection_method == "exact"  # the registry still works


PLUGIN = """
from dataclasses import dataclass, field

import numpy as np

from hf_clipsel.core.names import budget
from hf_clipsel.selection import SelectionResult, register_selector


@dataclass
class LastRowsOptions:
    last_rows_skip: int = field(default=0, metadata={"help": "rows at the end never kept"})


@register_selector("last_rows", options=LastRowsOptions)
def last_rows(inputs, ratios, config):
    rows = np.flatnonzero(inputs.valid)[: inputs.num_rows - config.selector_options.last_rows_skip][::-1]
    result = SelectionResult()
    for ratio in ratios:
        k = budget(ratio, inputs.num_rows)
        mask = np.zeros(inputs.num_rows, dtype=bool)
        mask[rows[:k]] = True
        result.add(ratio, mask, k, rows.size)
    return result
"""


def installed_plugin(root: Path) -> dict:
    """A distribution installed in ``root`` (its package and its ``.dist-info`` with an entry point in the group
    ``hf_clipsel.selectors``, as pip writes them); the environment that puts ``root`` on the path."""
    (root / "clipsel_last_rows").mkdir(parents=True)
    (root / "clipsel_last_rows" / "__init__.py").write_text(PLUGIN)
    info = root / "clipsel_last_rows-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clipsel-last-rows\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hf_clipsel.selectors]\nlast_rows = clipsel_last_rows\n")
    (info / "RECORD").write_text("")
    path = os.pathsep.join([str(root), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


@pytest.fixture(scope="module")
def small_run(cifar_slice, tiny_clip_path, tmp_path_factory):
    from hf_clipsel.pipeline import run

    output_dir = tmp_path_factory.mktemp("run")
    config = run_config(cifar_slice, tiny_clip_path, output_dir, selection_ratios=[0.3], max_samples=120)
    return config, output_dir, run(config)


def test_the_cli_runs_a_selector_installed_through_an_entry_point(small_run, tmp_path):
    config, output_dir, _ = small_run
    env = installed_plugin(tmp_path / "site")
    result = cli(
        "select",
        "--dataset_name", config.data.dataset_name,
        "--max_samples", "120",
        "--scores_from", str(output_dir),
        "--output_dir", str(tmp_path / "reselected"),
        "--selection_ratios", "0.3",
        "--selection_method", "last_rows",
        "--last_rows_skip", "10",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    import pandas as pd

    scores = pd.read_parquet(tmp_path / "reselected" / "scores")
    assert scores.loc[scores["is_selected_ratio_0.3"], "row_id"].tolist() == list(range(74, 110))
    without = cli("run", "--help", env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "--last_rows_skip" not in without.stdout and "--last_rows_skip" in cli("run", "--help", env=env).stdout
    assert sys.modules.get("clipsel_last_rows") is None  # it never leaked into this process


class Brightness(Score):
    """A score in one file: the mean grey level, measured while decoding; very dark images are demoted."""

    name = "brightness"
    columns = (Column("brightness", "mean grey level of the image", "[0, 1]; higher: brighter"),)
    measures_pixels = True
    drop_reason = "too dark"
    reason_rank = 25
    flag_column = "too_dark"

    def measure(self, image):
        return (0.0,) if image is None else (float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255),)

    def flags(self, table, selection):
        dark = (np.asarray(table["brightness"]) < 0.08) & (np.asarray(table["flag_reason"]) == "")
        return np.where(dark, "too dark", "").astype(object)


@pytest.fixture
def brightness_score():
    register_score(Brightness)
    try:
        yield
    finally:
        del SCORES["brightness"]


def test_a_score_added_in_one_file_reaches_the_table_the_reasons_the_summary_the_report_and_the_card(
    brightness_score, cifar_slice, tiny_clip_path, tmp_path
):
    import pandas as pd
    from datasets import Image, load_dataset

    from hf_clipsel.pipeline import run

    source = load_dataset("parquet", data_files=str(cifar_slice), split="train").select(range(120))
    dark_rows = list(range(0, 120, 10))

    def darken(row, index):
        if index in dark_rows:
            row["img"] = row["img"].point(lambda value: value // 16)
        return row

    source.map(darken, with_indices=True).cast_column("img", Image()).to_parquet(str(tmp_path / "dark.parquet"))
    output_dir = tmp_path / "out"
    summary = run(run_config(tmp_path / "dark.parquet", tiny_clip_path, output_dir, damage_check=False))
    scores = pd.read_parquet(output_dir / "scores")
    assert scores.index[scores["brightness"] < 0.08].tolist() == dark_rows  # the table: measured while decoding
    assert scores.index[scores["too_dark"] == "too dark"].tolist() == dark_rows  # its flags
    assert (scores.loc[dark_rows, "drop_reason_ratio_0.5"] == "too dark").all()  # the drop reasons
    assert not scores.loc[dark_rows, "is_selected_ratio_0.5"].any()  # demoted: 60 of 108 others fill the budget
    assert summary.ratios["0.5"].dropped_by_reason["too dark"] == len(dark_rows)  # the summary
    assert summary.flags["too_dark"] == {"too dark": len(dark_rows)}
    report = (output_dir / "report" / "index.html").read_text()
    assert "too dark" in report and "brightness" in report  # the report
    card = (output_dir / "README.md").read_text()
    assert "| too dark |" in card and "`brightness`" in card  # the card


def test_the_readme_selector_example_runs(tmp_path):
    import re

    section = (REPO / "README.md").read_text().split("## Extending hf_clipsel")[1]
    code = re.search(r"\*\*A selector\*\*.*?```python\n(.*?)```", section, flags=re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    try:
        config = parse_config(
            ["--selection_method", "cleanest", "--cleanest_margin", "0.5", "--selection_ratios", "0.3"]
        )
        inputs = SelectionInputs(np.arange(10), np.zeros(10), np.linspace(0, 1, 10), np.zeros(10))
        assert np.flatnonzero(select(inputs, config.selection)[0.3]).tolist() == [7, 8, 9]
    finally:
        del SELECTORS["cleanest"]
