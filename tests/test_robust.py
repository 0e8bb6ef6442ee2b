"""Robust selection mechanisms: the diversity gate, the class posterior in the alignment term, the damage check
and its demotion, reason codes, the held-out agreement check and its fallback, and the `paper` preset."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from datasets import load_dataset

from hf_clipsel.adaptation import split_holdout
from hf_clipsel.configs import ClipselConfig, SelectionConfig
from hf_clipsel.parser import parse_config
from hf_clipsel.pipeline import run
from hf_clipsel.reasons import drop_reasons
from hf_clipsel.scores_table import explained_drops
from hf_clipsel.scoring import POSTERIOR_LOGIT_FRACTION, class_posterior
from hf_clipsel.selection import SelectionInputs, SgdOptions, select
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
        SelectionConfig(
            selection_ratios=[0.4], alpha=1.0, selection_method="sgd", options=SgdOptions(sgd_exact_trim=True)
        ),
    )[0.4]
    assert not sgd[:4].any()


def test_reason_codes():
    selected = np.array([True, False, False, False, False, False, False, True])
    decode_ok = np.array([True, False, True, True, True, True, True, True])
    flagged = np.array([False, True, True, False, False, False, False, False])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 0, 1, 0, 0, 1, 1])
    diversity = np.array([0.5, 0.0, 0.0, 0.9, 0.1, 0.8, 0.2, 0.9])
    # the registered scores explain the drops (misaligned, redundant), read from the scores table's columns
    table = {
        "label": labels,
        "predicted_label": predicted,
        "sample_diversity_normalized": diversity,
        "flag_reason": np.where(flagged, "label missing", ""),
    }
    explained = explained_drops(table, SelectionConfig(damage_check=False))
    reasons = drop_reasons(selected, decode_ok, flagged, explained).tolist()
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
    # a damaged row is "damaged" whatever else it is, unless kept; an undecodable one stays "undecodable"
    damaged = np.array([True, True, False, True, False, True, False, False])
    reasons = drop_reasons(selected, decode_ok, flagged, [*explained, ("damaged", damaged)]).tolist()
    assert reasons == ["", "undecodable", "unusable label", "damaged", "redundant", "damaged", "redundant", ""]


def test_demoted_rows_are_taken_last_and_only_when_the_budget_needs_them():
    # rows 0-2 have the best scores but are demoted (damaged): both optimisers take the other rows first
    alignment = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=np.float32)
    inputs = SelectionInputs(
        row_id=np.arange(10),
        labels=np.zeros(10),
        semantic_alignment_normalized=alignment,
        sample_diversity_normalized=np.zeros(10, dtype=np.float32),
        valid=np.array([True] * 9 + [False]),
        demoted=np.arange(10) < 3,
    )
    masks = select(inputs, SelectionConfig(selection_ratios=[0.5, 0.8], alpha=0.0))
    assert masks[0.5].tolist() == [False, False, False, True, True, True, True, True, False, False]
    # 8 rows asked, 6 undemoted valid rows: the two best demoted rows fill the budget, the invalid row never
    assert masks[0.8].tolist() == [True, True, False, True, True, True, True, True, True, False]
    reward = inputs.reward(0.0)
    assert reward[:3].max() < reward[3:9].min() and reward[0] > reward[1] > reward[2]  # order kept among them
    sgd = select(
        inputs,
        SelectionConfig(
            selection_ratios=[0.5], alpha=0.0, selection_method="sgd", options=SgdOptions(sgd_exact_trim=True)
        ),
    )[0.5]
    assert not sgd[:3].any() and sgd.sum() == 5


def test_the_posterior_enters_the_alignment_term_as_a_min_max_sum():
    sas = np.array([0.0, 0.5, 1.0, 0.5], dtype=np.float32)
    posterior = np.array([1.0, 0.0, 0.0, 0.2], dtype=np.float32)
    common = dict(row_id=np.arange(4), labels=np.zeros(4), sample_diversity_normalized=np.zeros(4, dtype=np.float32))
    blended = SelectionInputs(**common, semantic_alignment_normalized=sas, class_posterior_normalized=posterior)
    # sums 1.0, 0.5, 1.0, 0.7 -> min-max over the rows
    np.testing.assert_allclose(blended.alignment().numpy(), [1.0, 0.0, 1.0, 0.4], rtol=1e-6)
    plain = SelectionInputs(**common, semantic_alignment_normalized=sas)
    np.testing.assert_array_equal(plain.alignment().numpy(), sas)
    # row 1 (fair cosine, but CLIP prefers another class) now ranks last
    assert np.argmin(blended.reward(0.0)) == 1 and np.argmin(plain.reward(0.0)) == 0
    alone = SelectionInputs(
        **common, semantic_alignment_normalized=sas, class_posterior_normalized=posterior, posterior_alone=True
    )
    np.testing.assert_array_equal(alone.alignment().numpy(), posterior)  # the default: SAS plays no part
    assert list(np.argsort(-alone.reward(0.0), kind="stable")) == [0, 3, 1, 2]


def test_class_posterior_is_the_softmax_over_the_class_prompts_at_the_label():
    generator = torch.Generator().manual_seed(0)
    images, text = torch.randn(50, 8, generator=generator), torch.randn(4, 8, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    cosine = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    expected = torch.softmax(POSTERIOR_LOGIT_FRACTION * 30.0 * cosine, dim=-1)[torch.arange(50), labels]
    torch.testing.assert_close(class_posterior(images, text, labels, 30.0), expected)
    with pytest.raises(ValueError, match="labels must lie in"):
        class_posterior(images, text, labels + 4, 30.0)


def test_paper_preset_sets_defaults_that_flags_override():
    paper = parse_config(["--preset", "paper"])
    assert paper.selection.alpha is None and paper.adapter.adapter_holdout_fraction == 0.0
    assert paper.selection.alpha_for(0.3) == 0.3
    assert parse_config(["--preset", "paper", "--alpha", "0.2"]).selection.alpha == 0.2
    assert ClipselConfig.from_flat({"preset": "paper", "knn_k": 7}).selection.alpha is None
    assert parse_config([]).adapter.adapter_holdout_fraction == 0.1  # the default checks its adapters
    assert (paper.selection.alignment, paper.selection.damage_check) == ("sas", False)
    defaults = parse_config([]).selection  # issue 28: the posterior alone, threshold 3.5 (benchmarks README)
    assert (defaults.alignment, defaults.damage_check, defaults.damage_threshold) == ("posterior", True, 3.5)
    # issue 28: a tail flagged only beyond its mirror; null (in a config file) flags every row beyond 3.5
    assert defaults.damage_false_discovery == 0.25
    assert ClipselConfig.from_flat({"damage_false_discovery": None}).selection.damage_false_discovery is None
    with pytest.raises(ValueError, match="damage_false_discovery must be in"):
        parse_config(["--damage_false_discovery", "1.5"])
    # issue 25: copies found and one kept by default, crops only on request (issue 28: the crop search joins distinct
    # images of natural pools); the paper's method has no duplicate check
    assert defaults.duplicate_check and not paper.selection.duplicate_check
    assert not parse_config([]).scoring.duplicate_crops and parse_config(["--duplicate_crops"]).scoring.duplicate_crops
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
    check = summary.adapter_check
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


def test_drop_reasons_are_arrow_strings_without_a_python_object_per_row():
    """At 13M rows a Python object per row and reason (an object array's 8 bytes, more for a string of its own) cost
    up to 90 bytes a row at the selection's peak: the reasons come as an Arrow string array, made from each row's
    reason code."""
    from hf_clipsel.reasons import OUTSIDE_BUDGET

    rng = np.random.default_rng(0)
    selected, redundant = rng.random(1000) < 0.3, rng.random(1000) < 0.5
    reasons = drop_reasons(selected, np.ones(1000, bool), np.zeros(1000, bool), [("redundant", redundant)])
    assert isinstance(reasons, pa.StringArray) and len(reasons) == 1000
    values = np.asarray(reasons.to_pylist(), dtype=object)
    assert set(values[selected]) == {""} and set(values[~selected & redundant]) == {"redundant"}
    assert set(values[~selected & ~redundant]) == {OUTSIDE_BUDGET}
