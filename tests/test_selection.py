"""Selectors: exact against brute force, properties, the released SGD at 50k rows, baselines, registry."""

from __future__ import annotations

import itertools
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_clipsel.configs import SelectionConfig, budget
from hf_clipsel.selection import (
    SELECTORS,
    SelectionInputs,
    SgdOptions,
    class_quotas,
    get_selector,
    register_selector,
    select,
)
from hf_clipsel.selection.moderate import distance_to_class_median
from hf_clipsel.selection.registry import ranking, top_k, top_of_ranking

BASELINES = ("random", "clip_score", "moderate", "ccs")


def make_inputs(num_rows: int, seed: int = 0, num_classes: int = 4, invalid_fraction: float = 0.0, dim: int = 8):
    rng = np.random.default_rng(seed)
    # unequal class sizes on purpose
    labels = rng.choice(num_classes, size=num_rows, p=np.arange(1, num_classes + 1) / sum(range(1, num_classes + 1)))
    return SelectionInputs(
        row_id=rng.permutation(num_rows * 3)[:num_rows],
        labels=labels,
        semantic_alignment_normalized=rng.beta(5, 2, num_rows),
        sample_diversity_normalized=rng.beta(2, 5, num_rows),
        valid=rng.random(num_rows) >= invalid_fraction,
        image_features=torch.tensor(rng.normal(size=(num_rows, dim)), dtype=torch.float32),
    )


def brute_force_exact(inputs: SelectionInputs, k: int, alpha: float) -> np.ndarray:
    """Maximise the sum of rewards over every subset of k valid rows; ties: the smallest row ids."""
    rewards = inputs.reward(alpha)
    candidates = np.flatnonzero(inputs.valid)
    k = min(k, len(candidates))
    best, best_key = None, None
    for subset in itertools.combinations(candidates, k):
        # Exact rational sums: a float sum could tie two subsets that are not equally good.
        key = (
            sum(Fraction(rewards[i]) for i in subset),
            tuple(-inputs.row_id[i] for i in sorted(subset, key=lambda i: inputs.row_id[i])),
        )
        if best_key is None or key > best_key:
            best, best_key = subset, key
    mask = np.zeros(inputs.num_rows, dtype=bool)
    mask[list(best)] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(
    num_rows=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    ratio=st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.57, 0.75, 1.0]),
    alpha=st.sampled_from([0.0, 0.1, 1.0]),
    ties=st.booleans(),
)
def test_exact_equals_brute_force(num_rows, seed, ratio, alpha, ties):
    inputs = make_inputs(num_rows, seed, invalid_fraction=0.2)
    if ties:  # few distinct values, so that the row-id tie-break decides
        inputs.semantic_alignment_normalized = np.round(inputs.semantic_alignment_normalized * 2) / 2
        inputs.sample_diversity_normalized = np.round(inputs.sample_diversity_normalized * 2) / 2
        inputs.semantic_alignment_normalized = inputs.semantic_alignment_normalized.astype(np.float32)
        inputs.sample_diversity_normalized = inputs.sample_diversity_normalized.astype(np.float32)
    config = SelectionConfig(selection_ratios=[ratio], selection_method="exact", alpha=alpha)
    got = select(inputs, config)[ratio]
    np.testing.assert_array_equal(got, brute_force_exact(inputs, budget(ratio, num_rows), alpha))


def test_exact_breaks_ties_by_row_id():
    inputs = SelectionInputs(
        row_id=[40, 10, 30, 20],
        labels=[0, 0, 0, 0],
        semantic_alignment_normalized=[0.5, 0.5, 0.5, 0.5],
        sample_diversity_normalized=[0.5, 0.5, 0.5, 0.5],
    )
    mask = select(inputs, SelectionConfig(selection_ratios=[0.5], selection_method="exact"))[0.5]
    assert sorted(inputs.row_id[mask]) == [10, 20]


def test_exact_keeps_exactly_the_budget_at_a_ratio_with_a_float_artefact():
    inputs = make_inputs(50_000, seed=5)
    inputs.valid[:] = True
    result = select(inputs, SelectionConfig(selection_ratios=[0.57], selection_method="exact"))
    assert result[0.57].sum() == 28_500 and result.diagnostics[0.57]["budget"] == 28_500


ratio_lists = st.lists(
    st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.45, 0.5, 0.8, 0.9, 1.0]), min_size=1, max_size=4, unique=True
)


@settings(max_examples=80, deadline=None)
@given(
    num_rows=st.integers(1, 80),
    seed=st.integers(0, 2**16),
    ratios=ratio_lists,
    alpha=st.sampled_from([0.0, 0.1, 2.0]),
    ties=st.booleans(),
)
def test_exact_properties(num_rows, seed, ratios, alpha, ties):
    inputs = make_inputs(num_rows, seed, invalid_fraction=0.1)
    if ties:
        inputs.semantic_alignment_normalized = (np.round(inputs.semantic_alignment_normalized * 3) / 3).astype(
            np.float32
        )
    config = SelectionConfig(selection_ratios=ratios, selection_method="exact", alpha=alpha)
    result = select(inputs, config)
    num_valid = int(inputs.valid.sum())
    previous = np.zeros(num_rows, dtype=bool)
    for ratio in config.selection_ratios:  # sorted ascending by the config
        mask = result[ratio]
        k = budget(ratio, num_rows)
        assert mask.dtype == bool and mask.shape == (num_rows,)
        assert mask.sum() == min(k, num_valid)  # exact size
        assert not mask[~inputs.valid].any()  # only valid rows
        assert result.diagnostics[ratio]["shortfall"] == max(k - num_valid, 0)
        assert np.all(mask[previous])  # a larger ratio's subset contains the smaller one's
        previous = mask
    # deterministic
    again = select(inputs, config)
    assert all(np.array_equal(again[r], result[r]) for r in ratios)
    # invariant to the row order: permute the rows, map back by row id
    permutation = np.random.default_rng(seed + 1).permutation(num_rows)
    permuted = SelectionInputs(
        row_id=inputs.row_id[permutation],
        labels=inputs.labels[permutation],
        semantic_alignment_normalized=inputs.semantic_alignment_normalized[permutation],
        sample_diversity_normalized=inputs.sample_diversity_normalized[permutation],
        valid=inputs.valid[permutation],
    )
    permuted_result = select(permuted, config)
    for ratio in ratios:
        assert set(permuted.row_id[permuted_result[ratio]]) == set(inputs.row_id[result[ratio]])


def test_exact_with_alpha_equal_to_ratio():
    inputs = make_inputs(500, seed=2)
    result = select(inputs, SelectionConfig(selection_ratios=[0.2, 0.8], alpha=None))
    for ratio in (0.2, 0.8):
        fixed = select(inputs, SelectionConfig(selection_ratios=[ratio], alpha=ratio))
        np.testing.assert_array_equal(result[ratio], fixed[ratio])
        assert result.diagnostics[ratio]["alpha"] == ratio


def released_loop(sas_n: np.ndarray, sds_n: np.ndarray, k: int, alpha: float = 0.1, beta: float = 2.0) -> tuple:
    """The released selection script's loop, transcribed as it is written there (independently of hf_clipsel): it
    steps, then stops once the ratio loss it measured before that step is below 1e-3. Returns the mask it measured
    then (x > 0.5), the mask after its last step (what the released code keeps), and the steps before the check."""
    sas = torch.tensor(sas_n / sas_n.mean(), dtype=torch.float32)
    sds = torch.tensor(sds_n / sds_n.mean(), dtype=torch.float32)
    w = torch.nn.Parameter(torch.full((len(sas),), 0.01))
    optimizer = torch.optim.SGD([w], lr=1e-3, momentum=0.9)
    for iteration in range(100_000):  # noqa: B007 (the count is returned)
        x = torch.sigmoid(100 * w)
        ste = (x > 0.5).float() - x.detach() + x
        ratio_loss = beta * torch.abs(ste.sum() - k) / len(sas)
        loss = -(x * sas).mean() - alpha * (x * sds).mean() + ratio_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ratio_loss.item() < 1e-3:
            break
    return (x > 0.5).numpy(), (torch.sigmoid(100 * w) > 0.5).numpy(), iteration


def test_sgd_reproduces_the_released_optimiser_at_50k():
    num_rows, ratio = 50_000, 0.5
    inputs = make_inputs(num_rows, seed=11)
    inputs.valid[:] = True
    inputs.valid[:20] = False  # a few undecodable rows never get selected
    k = budget(ratio, num_rows)
    start = time.perf_counter()
    result = select(inputs, SelectionConfig(selection_ratios=[ratio], selection_method="sgd"))
    elapsed = time.perf_counter() - start
    mask, diagnostics = result[ratio], result.diagnostics[ratio]
    exact = select(inputs, SelectionConfig(selection_ratios=[ratio], selection_method="exact"))[ratio]
    assert diagnostics["converged"] and diagnostics["iterations"] > 0
    assert abs(int(mask.sum()) - k) <= 0.0005 * num_rows  # the released stopping tolerance
    assert diagnostics["count_error"] == abs(int(mask.sum()) - k)
    assert not mask[~inputs.valid].any()
    overlap = (mask & exact).sum() / k
    assert overlap >= 0.999
    assert diagnostics["overlap_with_exact"] == pytest.approx(overlap)
    # against the released loop itself, on rows that are all valid (as the released code assumes): the same steps and
    # exactly the mask that met the stopping rule; the released code then takes one more step, which moves a few rows
    inputs.valid[:] = True
    ours = select(inputs, SelectionConfig(selection_ratios=[ratio], selection_method="sgd"))
    at_check, after_step, released_iterations = released_loop(
        inputs.semantic_alignment_normalized, inputs.sample_diversity_normalized, k
    )
    assert released_iterations == ours.diagnostics[ratio]["iterations"]
    np.testing.assert_array_equal(ours[ratio], at_check)
    assert (after_step != at_check).sum() <= 0.001 * num_rows
    inputs.valid[:20] = False
    print(f"sgd at N=50,000: {diagnostics['iterations']} iterations, {elapsed:.1f}s")  # visible with -s

    trimmed = select(
        inputs,
        SelectionConfig(selection_ratios=[ratio], selection_method="sgd", options=SgdOptions(sgd_exact_trim=True)),
    )
    assert trimmed[ratio].sum() == k
    assert not trimmed[ratio][~inputs.valid].any()
    assert (trimmed[ratio] & exact).sum() / k >= 0.999
    assert trimmed.diagnostics[ratio]["count_before_trim"] == mask.sum()


def test_sgd_trim_fills_and_cuts_by_reward():
    from hf_clipsel.selection.sgd import trim_to_budget

    order = np.array([3, 0, 2, 1, 4])  # best first
    valid = np.array([True, True, True, True, False])
    too_many = np.array([True, True, True, False, False])
    assert np.flatnonzero(trim_to_budget(too_many, order, valid, 2)).tolist() == [0, 2]
    too_few = np.array([False, True, False, False, False])
    assert np.flatnonzero(trim_to_budget(too_few, order, valid, 3)).tolist() == [0, 1, 3]


def test_sgd_short_cuts_when_budget_covers_every_valid_row():
    inputs = make_inputs(100, seed=3, invalid_fraction=0.5)
    result = select(inputs, SelectionConfig(selection_ratios=[0.9], selection_method="sgd"))
    np.testing.assert_array_equal(result[0.9], inputs.valid)
    assert result.diagnostics[0.9]["iterations"] == 0
    with pytest.raises(ValueError, match="class_balanced"):
        select(inputs, SelectionConfig(selection_method="sgd", class_balanced=True))


@pytest.mark.parametrize("method", ("exact", *BASELINES))
@pytest.mark.parametrize("class_balanced", (False, True))
def test_every_selector_returns_exactly_k_valid_rows(method, class_balanced):
    inputs = make_inputs(1_000, seed=4, num_classes=7, invalid_fraction=0.05)
    ratios = [0.01, 0.1, 0.33, 0.9, 0.95, 1.0]
    result = select(
        inputs, SelectionConfig(selection_ratios=ratios, selection_method=method, class_balanced=class_balanced)
    )
    num_valid = int(inputs.valid.sum())
    valid_labels = inputs.labels[inputs.valid]
    for ratio in ratios:
        mask, k = result[ratio], budget(ratio, inputs.num_rows)
        assert mask.sum() == min(k, num_valid), (method, ratio)
        assert not mask[~inputs.valid].any()
        if class_balanced:
            kept = min(k, num_valid)
            for label in np.unique(valid_labels):
                share = kept * (valid_labels == label).sum() / num_valid
                assert abs((inputs.labels[mask] == label).sum() - share) < 1


def test_random_is_seeded():
    inputs = make_inputs(300, seed=6)
    config = SelectionConfig(selection_ratios=[0.2, 0.5], selection_method="random", seed=1)
    first, second = select(inputs, config), select(inputs, config)
    assert all(np.array_equal(first[r], second[r]) for r in (0.2, 0.5))
    assert np.all(first[0.5][first[0.2]])  # one random order serves every ratio
    other = select(inputs, SelectionConfig(selection_ratios=[0.2, 0.5], selection_method="random", seed=2))
    assert not np.array_equal(first[0.5], other[0.5])
    ccs_config = SelectionConfig(selection_ratios=[0.3], selection_method="ccs", seed=1)
    assert np.array_equal(select(inputs, ccs_config)[0.3], select(inputs, ccs_config)[0.3])


def test_clip_score_keeps_the_best_aligned_rows():
    inputs = make_inputs(200, seed=7)
    mask = select(inputs, SelectionConfig(selection_ratios=[0.25], selection_method="clip_score"))[0.25]
    alignment = inputs.semantic_alignment_normalized
    assert alignment[mask & inputs.valid].min() >= alignment[~mask & inputs.valid].max()


def test_moderate_keeps_rows_closest_to_the_median_distance():
    inputs = make_inputs(300, seed=8, invalid_fraction=0.1)
    features = inputs.image_features.numpy().astype(np.float64)
    distance = np.full(inputs.num_rows, np.nan)
    for label in np.unique(inputs.labels):
        rows = np.flatnonzero((inputs.labels == label) & inputs.valid)
        distance[rows] = np.linalg.norm(features[rows] - np.median(features[rows], axis=0), axis=1)
    np.testing.assert_allclose(
        distance_to_class_median(inputs.image_features, inputs.labels, inputs.valid), distance, rtol=1e-5
    )
    gap = np.abs(distance - np.nanmedian(distance))
    mask = select(inputs, SelectionConfig(selection_ratios=[0.4], selection_method="moderate"))[0.4]
    assert gap[mask].max() <= gap[~mask & inputs.valid].min()
    inputs.image_features = None
    with pytest.raises(ValueError, match="image features"):
        select(inputs, SelectionConfig(selection_method="moderate"))


def test_ccs_prunes_the_hardest_and_covers_the_range():
    inputs = make_inputs(2_000, seed=9)
    inputs.valid[:] = True
    mask = select(inputs, SelectionConfig(selection_ratios=[0.3], selection_method="ccs"))[0.3]
    difficulty = 1 - inputs.semantic_alignment_normalized
    hardest = np.argsort(-difficulty, kind="stable")[:200]
    assert not mask[hardest].any()
    # every difficulty stratum that has rows contributes some
    kept = np.setdiff1d(np.arange(2_000), hardest)
    edges = np.linspace(difficulty[kept].min(), difficulty[kept].max(), 51)
    strata = np.minimum(np.digitize(difficulty[kept], edges[1:-1]), 49)
    selected_strata = set(strata[mask[kept]])
    assert selected_strata == set(strata)


def test_class_quotas_largest_remainder():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    assert class_quotas(labels, 5) == {0: 3, 1: 1, 2: 1}  # shares 2.5, 1.5, 1.0: the tie goes to the smaller label
    assert class_quotas(labels, 10) == {0: 5, 1: 3, 2: 2}
    assert class_quotas(labels, 0) == {0: 0, 1: 0, 2: 0}
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = rng.integers(0, 6, rng.integers(1, 200))
        k = int(rng.integers(0, len(labels) + 1))
        quotas = class_quotas(labels, k)
        assert sum(quotas.values()) == k
        for label, quota in quotas.items():
            size = (labels == label).sum()
            assert abs(quota - k * size / len(labels)) < 1 and quota <= size


def test_registry_refuses_duplicates_and_names_the_known_methods():
    assert {"exact", "sgd", *BASELINES} <= set(SELECTORS)
    with pytest.raises(ValueError, match="already registered"):
        register_selector("exact")(lambda inputs, ratios, config: None)
    with pytest.raises(ValueError, match="unknown selection method 'nope'.*exact"):
        get_selector("nope")

    @register_selector("test_only")
    def selector(inputs, ratios, config):
        return {}

    try:
        assert get_selector("test_only") is selector
    finally:
        del SELECTORS["test_only"]


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="row_id has duplicates"):
        SelectionInputs([1, 1], [0, 0], [0.1, 0.2], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels has shape"):
        SelectionInputs([1, 2], [0], [0.1, 0.2], [0.1, 0.2])


def test_top_k_matches_the_full_ranking_with_ties_and_invalid_rows():
    """The partition cut picks the same rows as the sorted ranking (ties by row id), for every k."""
    rng = np.random.default_rng(3)
    num_rows = 400
    inputs = SelectionInputs(
        row_id=rng.permutation(10 * num_rows)[:num_rows],
        labels=rng.integers(0, 4, num_rows),
        semantic_alignment_normalized=np.zeros(num_rows),
        sample_diversity_normalized=np.zeros(num_rows),
        valid=rng.random(num_rows) > 0.2,
    )
    key = rng.integers(0, 12, num_rows).astype(np.float64)  # many ties
    key[rng.choice(num_rows, 10, replace=False)] = np.nan
    order = ranking(np.where(np.isnan(key), -np.inf, key), inputs.row_id)
    for k in [0, 1, 7, 50, 199, int(inputs.valid.sum()), num_rows]:
        assert np.array_equal(top_k(key, inputs, k, False), top_of_ranking(order, inputs, k, False)), k
