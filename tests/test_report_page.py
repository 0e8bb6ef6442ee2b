"""The report page's data files: the thumbnail sample of a large run covers every class and outcome at every ratio,
and the paged columns decode back to the scores table."""

import base64
import json
import re

import numpy as np
import pyarrow as pa
import pytest

from hf_clipsel import report_page
from hf_clipsel.report_page import SAMPLE_PER_GROUP, sample_rows
from hf_clipsel.report_page_data import PAGE_ROWS, write_data

DTYPES = {"i8": "<i1", "u8": "<u1", "i16": "<i2", "u16": "<u2", "i32": "<i4", "u32": "<u4", "f32": "<f4"}
REASONS = np.array(["", "misaligned", "redundant", "outside the budget"], dtype=object)


def synthetic_scores(num_rows: int, num_classes: int = 7, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns = {
        "row_id": np.arange(num_rows, dtype=np.int64),
        "label": rng.integers(-1, num_classes, num_rows),
        "predicted_label": rng.integers(0, num_classes, num_rows),
        "flag_reason": np.where(rng.random(num_rows) < 0.01, "label missing", ""),
        "semantic_alignment": rng.normal(0.2, 0.05, num_rows).astype(np.float32),
    }
    for ratio in (0.3, 0.5):
        kept = rng.random(num_rows) < ratio
        columns[f"is_selected_ratio_{ratio:g}"] = kept
        columns[f"drop_reason_ratio_{ratio:g}"] = np.where(kept, "", REASONS[rng.integers(1, 4, num_rows)])
    return pa.table(columns)


def test_the_sample_holds_a_few_rows_of_every_class_and_outcome_at_every_ratio(monkeypatch):
    monkeypatch.setattr(report_page, "SAMPLE_ALL_UP_TO", 1_000)
    table = synthetic_scores(20_000)
    chosen = sample_rows(table, "sample")
    assert chosen.sum() < len(table) // 10  # a sample, not every row
    labels = table.column("label").to_numpy()
    for ratio in (0.3, 0.5):
        kept = table.column(f"is_selected_ratio_{ratio:g}").to_numpy(zero_copy_only=False)
        reasons = table.column(f"drop_reason_ratio_{ratio:g}").to_numpy(zero_copy_only=False)
        outcome = np.where(kept, "kept", reasons)
        for group in {(int(c), str(o)) for c, o in zip(labels, outcome)}:
            members = (labels == group[0]) & (outcome == group[1])
            assert chosen[members].sum() >= min(SAMPLE_PER_GROUP, members.sum()), (ratio, group)
    assert sample_rows(table, "all").all()
    with pytest.raises(ValueError, match="thumbnails must be one of"):
        sample_rows(table, "some")


def test_paged_columns_decode_back_to_the_table(tmp_path):
    table = synthetic_scores(PAGE_ROWS + 123)
    manifest = write_data(table, [f"c{i}" for i in range(7)], tmp_path, np.zeros(len(table), bool), {"mode": "all"})
    assert manifest["num_pages"] == 2 and manifest["num_rows"] == len(table)

    def column(name: str) -> np.ndarray:
        spec = manifest["columns"][name]
        parts = []
        for page in range(manifest["num_pages"]):
            text = (tmp_path / "data" / f"{spec['file']}-{page:05d}.js").read_text()
            name_seen, page_seen, payload = re.fullmatch(r'CLIPSEL_CHUNK\((".*?"),(\d+),"(.*)"\);\n', text).groups()
            assert (json.loads(name_seen), int(page_seen)) == (name, page)
            parts.append(np.frombuffer(base64.b64decode(payload), dtype=DTYPES[spec["type"]]))
        return np.concatenate(parts)

    assert (column("row_id") == table.column("row_id").to_numpy()).all()
    assert (column("label") == table.column("label").to_numpy()).all()
    assert (column("semantic_alignment") == table.column("semantic_alignment").to_numpy()).all()
    reason = "drop_reason_ratio_0.3"
    texts = np.asarray(manifest["columns"][reason]["dictionary"], dtype=object)[column(reason)]
    assert (texts == table.column(reason).to_numpy(zero_copy_only=False)).all()
    assert [score["name"] for score in manifest["scores"]] == ["semantic_alignment"]  # only the columns present
