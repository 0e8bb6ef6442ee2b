"""Scores against independent numpy computations: SAS, SDS (brute-force kNN), min-max, reward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_clipsel.scoring import min_max, reward, sample_diversity, scale_by_mean, semantic_alignment


def brute_force_diversity(features: np.ndarray, labels: np.ndarray, k: int, valid: np.ndarray) -> np.ndarray:
    """Per-class kNN mean distance with double loops, in float64."""
    features = features.astype(np.float64)
    scores = np.zeros(len(labels))
    for i in range(len(labels)):
        if not valid[i]:
            continue
        distances = sorted(
            np.sqrt(((features[i] - features[j]) ** 2).sum())
            for j in range(len(labels))
            if j != i and valid[j] and labels[j] == labels[i]
        )
        scores[i] = np.mean(distances[:k]) if distances else 0.0
    return scores


def test_semantic_alignment_matches_numpy_cosine():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(40, 16)), rng.normal(size=(5, 16))
    labels = rng.integers(0, 5, 40)
    expected = np.array(
        [
            images[i] @ texts[labels[i]] / np.linalg.norm(images[i]) / np.linalg.norm(texts[labels[i]])
            for i in range(40)
        ]
    )
    got = semantic_alignment(torch.tensor(images), torch.tensor(texts), torch.tensor(labels))
    assert got.dtype == torch.float32 and got.shape == (40,)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    # bfloat16 features are upcast, not scored in bfloat16
    low = semantic_alignment(torch.tensor(images).bfloat16(), torch.tensor(texts).bfloat16(), torch.tensor(labels))
    assert low.dtype == torch.float32
    np.testing.assert_allclose(low.numpy(), expected, atol=2e-2)


def test_semantic_alignment_range_and_direction():
    text = torch.eye(3)
    images = torch.tensor([[2.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 1.0], [0, 0, 0]])
    got = semantic_alignment(images, text, torch.tensor([0, 0, 1, 2]))
    np.testing.assert_allclose(got.numpy(), [1.0, -1.0, np.sqrt(0.5), 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="labels must lie"):
        semantic_alignment(images, text, torch.tensor([0, 0, 1, 3]))


def test_sample_diversity_matches_brute_force_on_awkward_classes():
    rng = np.random.default_rng(1)
    # Unequal classes: 30 rows, 12 rows, 3 rows (< k + 1), a singleton, and a pair that becomes a singleton once
    # one of its rows is invalid. A common offset mimics CLIP features (large shared component).
    sizes = {0: 30, 1: 12, 2: 3, 3: 1, 4: 2}
    labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    features = rng.normal(size=(len(labels), 24)) + 5.0
    features[5] = features[3]  # exact duplicates within class 0
    features[6] = features[3]
    features[31] = features[30]  # and within class 1
    valid = np.ones(len(labels), dtype=bool)
    valid[[10, 11, 35, len(labels) - 1]] = False
    order = rng.permutation(len(labels))  # rows are not sorted by class
    features, labels, valid = features[order], labels[order], valid[order]
    k = 4
    expected = brute_force_diversity(features, labels, k, valid)
    got = sample_diversity(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), k, torch.tensor(valid))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    # Invalid rows and the lone rows score 0.0; duplicates are neighbours at distance 0.
    assert np.all(got.numpy()[~valid] == 0)
    singletons = [np.flatnonzero(order == len(labels) - 3)[0], np.flatnonzero(order == len(labels) - 2)[0]]
    assert np.all(got.numpy()[singletons] == 0)
    # Chunking changes nothing.
    chunked = sample_diversity(torch.tensor(features), torch.tensor(labels), k, torch.tensor(valid), chunk_rows=5)
    np.testing.assert_allclose(chunked.numpy(), got.numpy(), rtol=1e-6, atol=1e-6)


def test_duplicates_are_each_others_neighbours_at_zero():
    features = torch.tensor([[3.0, 4.0, 100.0], [3.0, 4.0, 100.0], [0.0, 0.0, 100.0]])
    got = sample_diversity(features, torch.tensor([7, 7, 7]), k=1)
    np.testing.assert_array_equal(got.numpy(), [0.0, 0.0, 5.0])


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=25),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    offset=st.sampled_from([0.0, 10.0]),
)
def test_sample_diversity_property_against_brute_force(labels, k, seed, offset):
    rng = np.random.default_rng(seed)
    labels = np.array(labels)
    features = rng.normal(size=(len(labels), 6)).astype(np.float32) + offset
    duplicates = rng.integers(0, len(labels), size=(len(labels) // 4, 2))
    features[duplicates[:, 0]] = features[duplicates[:, 1]]
    valid = rng.random(len(labels)) > 0.2
    expected = brute_force_diversity(features, labels, k, valid)
    got = sample_diversity(torch.tensor(features), torch.tensor(labels), k, torch.tensor(valid), chunk_rows=4)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_min_max_edge_cases():
    x = torch.tensor([2.0, 4.0, 3.0, 100.0])
    valid = torch.tensor([True, True, True, False])
    np.testing.assert_allclose(min_max(x, valid).numpy(), [0.0, 1.0, 0.5, 0.0])
    np.testing.assert_allclose(min_max(x).numpy(), [0.0, 2 / 98, 1 / 98, 1.0], rtol=1e-6)
    # constant over valid rows: nothing to rank by, all zeros
    assert min_max(torch.tensor([3.0, 3.0, 9.0]), torch.tensor([True, True, False])).tolist() == [0.0, 0.0, 0.0]
    assert min_max(torch.tensor([1.0, 2.0]), torch.tensor([False, False])).tolist() == [0.0, 0.0]
    assert min_max(torch.tensor([1.5], dtype=torch.float64)).dtype == torch.float32


def test_reward_formula_and_edge_cases():
    alignment = torch.tensor([0.0, 0.5, 1.0, 0.25])
    diversity = torch.tensor([1.0, 0.0, 0.5, 0.75])
    valid = torch.tensor([True, True, True, False])
    got = reward(alignment, diversity, alpha=0.3, valid=valid).numpy()
    mean_a, mean_d = 0.5, 0.5
    expected = [0 / mean_a + 0.3 * 1.0 / mean_d, 0.5 / mean_a + 0.0, 1.0 / mean_a + 0.3 * 0.5 / mean_d, -np.inf]
    np.testing.assert_allclose(got, expected)
    assert got.dtype == np.float64
    # a term whose mean is 0 contributes 0, no division by zero
    zero = torch.zeros(4)
    np.testing.assert_allclose(reward(alignment, zero, alpha=1.0).numpy(), alignment.numpy() / 0.4375)
    np.testing.assert_allclose(reward(zero, zero, alpha=1.0).numpy(), 0.0)
    # no valid rows: nothing can be selected
    assert np.all(np.isneginf(reward(alignment, diversity, 0.1, torch.zeros(4, dtype=torch.bool)).numpy()))
    with pytest.raises(ValueError, match="alpha"):
        reward(alignment, diversity, alpha=-1.0)


def test_scale_by_mean_is_order_free():
    rng = np.random.default_rng(3)
    values = torch.tensor(rng.random(1001), dtype=torch.float32)
    permutation = torch.tensor(rng.permutation(1001))
    scaled = scale_by_mean(values)
    assert torch.equal(scale_by_mean(values[permutation]), scaled[permutation])


def test_sample_diversity_bounds_the_distance_block(monkeypatch):
    import hf_clipsel.scoring as scoring

    rng = np.random.default_rng(4)
    features = torch.tensor(rng.normal(size=(300, 8)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 2, 300))
    expected = sample_diversity(features, labels, k=5)
    shapes = []
    addmm = torch.addmm

    def recording_addmm(*args, **kwargs):
        out = addmm(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(scoring, "_DIVERSITY_BLOCK_ELEMENTS", 2_000)
    monkeypatch.setattr(torch, "addmm", recording_addmm)
    got = sample_diversity(features, labels, k=5)
    assert shapes and max(rows * cols for rows, cols in shapes) <= 2_000
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6)


def test_group_rows_by_label_gives_each_class_its_rows_ascending():
    # (label, row id) packed in one int64 and sorted in place, for the memory of 13M rows: the same groups as a
    # stable argsort of the labels, for int32 and int64 row ids, negative labels, and labels too far apart to pack
    from hf_clipsel.scoring import group_rows_by_label

    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        labels = torch.randint(-3, 1 + trial % 9, (int(torch.randint(1, 300, (1,), generator=generator)),),
                               generator=generator)  # fmt: skip
        if trial % 6 == 0:
            labels = labels * 2**40  # beyond the packed path: the argsort
        rows = (torch.rand(len(labels), generator=generator) < 0.8).nonzero().squeeze(1)
        for dtype in (torch.int64, torch.int32):
            groups = group_rows_by_label(labels, rows.to(dtype))
            expected = [rows[labels[rows] == value].to(dtype) for value in torch.unique(labels[rows])]
            assert len(groups) == len(expected)
            for got, want in zip(groups, expected):
                assert got.dtype == dtype and torch.equal(got, want)
    assert group_rows_by_label(torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)) == []
