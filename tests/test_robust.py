"""Robust selection mechanisms: the diversity gate, reason codes, the held-out agreement check and its fallback,
and the `paper` preset."""

import numpy as np
import pandas as pd
import pytest
from datasets import load_dataset

from hf_clipsel.adaptation import split_holdout
from hf_clipsel.configs import ClipselConfig, SelectionConfig
from hf_clipsel.parser import parse_config
from hf_clipsel.pipeline import run
from hf_clipsel.reasons import drop_reasons
from hf_clipsel.selection import SelectionInputs, select
from tests.conftest import run_config


def test_the_gate_keeps_rare_but_misaligned_rows_out():
    # rows 0-3 align badly but are outliers (high diversity): the ungated reward pulls them back in
    alignment = np.array([0.1, 0.1, 0.1, 0.1, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6], dtype=np.float32)
    diversity = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
    agrees = alignment > 0.5
    inputs = dict(
        row_id=np.arange(10),
        labels=np.zeros(10),
        semantic_alignment_normalized=alignment,
        sample_diversity_normalized=diversity,
    )
    config = SelectionConfig(selection_ratios=[0.4], alpha=1.0)
    ungated = select(SelectionInputs(**inputs), config)[0.4]
    gated = select(SelectionInputs(**inputs, diversity_gate=agrees), config)[0.4]
    assert ungated[:4].all()
    assert not gated[:4].any() and gated.sum() == 4
    sgd = select(
        SelectionInputs(**inputs, diversity_gate=agrees),
        SelectionConfig(selection_ratios=[0.4], alpha=1.0, selection_method="sgd", sgd_exact_trim=True),
    )[0.4]
    assert not sgd[:4].any()


def test_reason_codes():
    selected = np.array([True, False, False, False, False, False, False, True])
    decode_ok = np.array([True, False, True, True, True, True, True, True])
    flagged = np.array([False, True, True, False, False, False, False, False])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 0, 1, 0, 0, 1, 1])
    diversity = np.array([0.5, 0.0, 0.0, 0.9, 0.1, 0.8, 0.2, 0.9])
    reasons = drop_reasons(selected, decode_ok, flagged, labels, predicted, diversity).tolist()
    assert reasons == [
        "",
        "undecodable",
        "unusable label",
        "misaligned",
        "redundant",
        "outside the budget",
        "redundant",
        "",
    ]


def test_paper_preset_sets_defaults_that_flags_override():
    paper = parse_config(["--preset", "paper"])
    assert paper.selection.alpha is None and paper.adapter.adapter_holdout_fraction == 0.0
    assert paper.selection.alpha_for(0.3) == 0.3
    assert parse_config(["--preset", "paper", "--alpha", "0.2"]).selection.alpha == 0.2
    assert ClipselConfig.from_flat({"preset": "paper", "knn_k": 7}).selection.alpha is None
    assert parse_config([]).adapter.adapter_holdout_fraction == 0.1  # the default checks its adapters
    with pytest.raises(ValueError, match="preset='fast' is not valid"):
        ClipselConfig.from_flat({"preset": "fast"})


@pytest.mark.slow
def test_adapters_that_learn_the_label_noise_fall_back_to_zero_shot(cifar_slice, tiny_clip_path, tmp_path):
    zero_shot_dir = tmp_path / "zero_shot"
    run(run_config(cifar_slice, tiny_clip_path, zero_shot_dir, adapter_preset="none"))
    zero_shot = pd.read_parquet(zero_shot_dir / "scores")
    predicted = zero_shot["predicted_label"].to_numpy()

    # Labels that teach the adapters a wrong mapping (zero-shot prediction + 1), except on the rows the check
    # holds out, which carry exactly what zero-shot CLIP predicts: learning the noise must lose agreement there.
    _, _, check_rows = split_holdout(np.arange(240), 0.2, seed=0)
    labels = (predicted + 1) % 10
    labels[check_rows] = predicted[check_rows]
    source = load_dataset("parquet", data_files=str(cifar_slice), split="train")
    noisy = (
        source.remove_columns("label")
        .add_column("label", labels.tolist())
        .cast_column("label", source.features["label"])
    )
    noisy.to_parquet(str(tmp_path / "noisy.parquet"))

    out = tmp_path / "adapted"
    summary = run(
        run_config(
            tmp_path / "noisy.parquet",
            tiny_clip_path,
            out,
            adapter_holdout_fraction=0.2,
            adapter_epochs=15,
            adapter_learning_rate=1e-2,
        )
    )
    check = summary["adapter_check"]
    assert check["held_out_rows"] == len(check_rows) == 24
    assert check["zero_shot_agreement"] == 1.0 and check["adapted_agreement"] < 1.0 and check["fell_back"]
    assert check["adapters_changed"]
    # scoring used zero-shot features: the same predictions as the zero-shot run
    assert pd.read_parquet(out / "scores")["predicted_label"].tolist() == predicted.tolist()


def test_sign_test_p_value_matches_the_binomial_tail():
    from math import comb

    from hf_clipsel.adaptation import sign_test_p_value

    for wins, losses in [(0, 0), (3, 0), (5, 5), (12, 4), (30, 17), (0, 9)]:
        n = wins + losses
        expected = sum(comb(n, i) for i in range(wins, n + 1)) / 2**n if n else 1.0
        assert sign_test_p_value(wins, losses) == pytest.approx(expected, rel=1e-9)
    assert sign_test_p_value(5000, 4000) < 1e-20  # large n: no overflow, no underflow to nonsense


def test_the_check_keeps_adapters_only_on_a_significant_gain():
    from hf_clipsel.adaptation import agreement_check

    zero_shot = np.zeros(500, dtype=bool)
    zero_shot[:200] = True
    small_gain = zero_shot.copy()
    small_gain[200:220] = True  # 20 rows only the adapters get right ...
    small_gain[:17] = False  # ... 17 only zero-shot gets right: +3 rows, as on the asymmetric-noise benchmark
    check = agreement_check(zero_shot, small_gain, confidence=0.95)
    assert check["adapted_agreement"] > check["zero_shot_agreement"] and check["fell_back"]
    assert (check["rows_only_adapted_agrees"], check["rows_only_zero_shot_agrees"]) == (20, 17)
    assert not agreement_check(zero_shot, small_gain, confidence=0)["fell_back"]  # the plain "not worse" rule

    clear_gain = zero_shot.copy()
    clear_gain[200:260] = True
    check = agreement_check(zero_shot, clear_gain, confidence=0.95)
    assert not check["fell_back"] and check["sign_test_p_value"] < 1e-10
    assert agreement_check(zero_shot, zero_shot, confidence=0.95)["fell_back"]  # no change: nothing to trust
    with pytest.raises(ValueError, match="adapter_check_confidence"):
        parse_config(["--adapter_check_confidence", "1"])
