"""Per-sample scores (README.md, "The method", step 2): semantic alignment, sample diversity, normalisation and
the reward.

Every function takes torch tensors and returns float tensors on the input's device. Scores are computed in
float32 whatever the input dtype (bfloat16 features are upcast first); the reward is float64 so that the
ranking built on it does not depend on the order of the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per block when gathering text features for the alignment score: bounds the temporary [block, d] copies.
_ALIGNMENT_BLOCK_ROWS = 65_536
# Logits held at once by the class posterior: 2**24 float32 = 64 MiB per block (21,000 classes: 798 rows a block).
_LOGIT_BLOCK_ELEMENTS = 1 << 24
# Distances held at once by sample_diversity when no chunk size is given: 2**24 float32 = 64 MiB per block.
_DIVERSITY_BLOCK_ELEMENTS = 1 << 24
# A squared distance from the expansion |a|^2 + |b|^2 - 2ab is off by about 1e-6 * (|a|^2 + |b|^2) in float32.
# Below this fraction of |a|^2 + |b|^2 that error is no longer negligible (and exact duplicates would come out
# near sqrt(1e-6) * |a| instead of 0), so such pairs are recomputed from the difference a - b.
_NEAR_PAIR_FRACTION = 1e-2


def _checked_labels_and_text(image_features: Tensor, class_text_features: Tensor, labels) -> tuple[Tensor, Tensor]:
    """Checks shared by the alignment scores; returns the labels as long and the normalised float32 text features."""
    labels = torch.as_tensor(labels, device=image_features.device).long()
    if image_features.ndim != 2 or class_text_features.ndim != 2:
        raise ValueError("image_features must be [N, d] and class_text_features [C, d].")
    if image_features.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_features.shape[0]} image features but {labels.shape[0]} labels.")
    if image_features.shape[1] != class_text_features.shape[1]:
        raise ValueError(
            f"image features have dimension {image_features.shape[1]}, text features {class_text_features.shape[1]}."
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= class_text_features.shape[0]):
        raise ValueError(
            f"labels must lie in [0, {class_text_features.shape[0]}); got {int(labels.min())}..{int(labels.max())}."
        )
    return labels, F.normalize(class_text_features.to(device=image_features.device, dtype=torch.float32), dim=-1)


def semantic_alignment(image_features: Tensor, class_text_features: Tensor, labels: Tensor) -> Tensor:
    """Semantic Alignment Score: cosine similarity of each image to the text feature of its *given* label.

    Args:
        image_features: ``[N, d]`` image features (any float dtype; not necessarily normalised).
        class_text_features: ``[C, d]`` one text feature per class, in label order.
        labels: ``[N]`` integer labels in ``[0, C)``.

    Returns:
        ``[N]`` float32 in ``[-1, 1]``; higher means the image agrees better with its label. A zero feature vector
        has similarity 0.
    """
    labels, text = _checked_labels_and_text(image_features, class_text_features, labels)
    alignment = torch.empty(labels.shape[0], dtype=torch.float32, device=image_features.device)
    # Blocks: the [N, C] similarity matrix or an [N, d] gathered copy would not fit for ImageNet-sized inputs.
    for start in range(0, labels.shape[0], _ALIGNMENT_BLOCK_ROWS):
        stop = start + _ALIGNMENT_BLOCK_ROWS
        images = F.normalize(image_features[start:stop].to(torch.float32), dim=-1)
        alignment[start:stop] = (images * text[labels[start:stop]]).sum(dim=-1)
    # Rounding can push a cosine a hair past +-1; the documented range is a promise.
    return alignment.clamp_(-1.0, 1.0)


# The softmax class posterior is taken at this fraction of the model's logit scale. Measured on the
# quality benchmark's label-noise pools (six noise draws, recipes/benchmarks/README.md): in the reward, 0.25 and 0.5
# kept less noise than SAS alone at every ratio of every case and draw; 1 did not (asymmetric noise at 0.5). As the
# reward's whole alignment term (issue 28, "Against cleanlab" there), of 0.5, 0.75, 1 (the full-scale probabilities
# cleanlab ranks) and 1.25 only 0.5 kept no more noise than cleanlab at ratios 0.3 and 0.5 of every case.
POSTERIOR_LOGIT_FRACTION = 0.5


def class_posterior(
    image_features: Tensor,
    class_text_features: Tensor,
    labels: Tensor,
    logit_scale: float,
    logit_bias: float = 0.0,
    link: str = "softmax",
) -> Tensor:
    """The model's zero-shot probability of each row's *given* label, from the logits ``logit_scale * cosine +
    logit_bias`` and the model family's ``link`` (hf_clipsel.models: ``posterior``).

    ``softmax`` (CLIP; SigLIP too, see hf_clipsel.models.siglip): softmax over the classes of
    ``POSTERIOR_LOGIT_FRACTION * logit_scale * cosine`` (the bias cancels), taken at the label. Where the alignment
    score asks "how close is the image to its label's prompt", this asks "how much closer than to every other
    class's": an image that sits near two prompts (a cat labelled dog) gets a lower posterior than its cosine
    suggests. ``sigmoid``: the sigmoid of the given label's full logit, each class judged alone.

    Same first three arguments as :func:`semantic_alignment`; returns ``[N]`` float32 in ``[0, 1]``.
    """
    if link not in ("softmax", "sigmoid"):
        raise ValueError(f"link must be softmax or sigmoid, got {link!r}.")
    labels, text = _checked_labels_and_text(image_features, class_text_features, labels)
    posterior = torch.empty(labels.shape[0], dtype=torch.float32, device=image_features.device)
    scale = (POSTERIOR_LOGIT_FRACTION if link == "softmax" else 1.0) * float(logit_scale)
    block_rows = logit_block_rows(text.shape[0])
    for start in range(0, labels.shape[0], block_rows):  # [block, C] logits at a time
        stop = start + block_rows
        logits = scale * F.normalize(image_features[start:stop].to(torch.float32), dim=-1) @ text.T
        if link == "softmax":
            posterior[start:stop] = torch.softmax(logits, dim=-1).gather(1, labels[start:stop, None]).squeeze(1)
        else:
            given = logits.gather(1, labels[start:stop, None]).squeeze(1)
            posterior[start:stop] = torch.sigmoid(given + float(logit_bias))
    return posterior


def logit_block_rows(num_classes: int) -> int:
    """Rows whose ``[rows, num_classes]`` logits fit one block of about 2**24 values (64 MiB), at least 1."""
    return max(1, min(_ALIGNMENT_BLOCK_ROWS, _LOGIT_BLOCK_ELEMENTS // max(num_classes, 1)))


def group_rows_by_label(labels: Tensor, rows: Tensor) -> list[Tensor]:
    """Split ``rows`` (ascending indices, such as a mask's ``nonzero()``) into one index tensor per value of
    ``labels[rows]`` (ascending), each in ascending row order and of ``rows``' dtype."""
    if rows.numel() == 0:
        return []
    keys = labels[rows].to(torch.int64)
    keys -= keys.min()
    if keys.device.type == "cpu" and int(keys.max()) < 2**31 and 0 <= int(rows.min()) and int(rows.max()) < 2**32:
        # (label, row id) packed in one int64 and sorted in place: no [N] index array and no stable sort's buffers,
        # about 20 bytes a row at the peak instead of 44 (13M rows: 0.3 GiB less, measured with mallinfo2)
        keys <<= 32
        keys += rows
        packed = keys.numpy()
        packed.sort()
        high = packed >> 32
        sizes = np.diff(np.flatnonzero(np.r_[True, high[1:] != high[:-1], True]))
        del high
        packed &= 0xFFFFFFFF
        return list(torch.split(torch.from_numpy(packed).to(rows.dtype), sizes.tolist()))
    order = torch.argsort(keys, stable=True)
    rows = rows[order]
    _, counts = torch.unique_consecutive(keys[order], return_counts=True)
    return list(torch.split(rows, counts.tolist()))


def _class_knn_mean_distance(features: Tensor, k: int, chunk_rows: int | None) -> Tensor:
    """Mean Euclidean distance from each row of ``features`` ([n, d], n >= 2) to its k nearest other rows."""
    num_rows = features.shape[0]
    neighbours = min(k, num_rows - 1)
    # Centring leaves every distance unchanged but shrinks |a|^2 + |b|^2, and with it the float32 cancellation
    # error of the expansion below (CLIP features share a large common component).
    centred = features - features.mean(dim=0, keepdim=True)
    squared_norms = (centred * centred).sum(dim=1)
    if chunk_rows is None:
        chunk_rows = max(1, _DIVERSITY_BLOCK_ELEMENTS // num_rows)
    mean_distance = torch.empty(num_rows, dtype=torch.float32, device=features.device)
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        queries = centred[start:stop]
        # |q - x|^2 = |q|^2 + |x|^2 - 2 q.x: one matmul instead of a [chunk, n, d] difference tensor.
        squared = torch.addmm(squared_norms.unsqueeze(0), queries, centred.T, alpha=-2.0)
        squared.add_(squared_norms[start:stop].unsqueeze(1)).clamp_(min=0.0)
        local = torch.arange(stop - start, device=features.device)
        # Self is excluded by index, not by distance, so an exact duplicate still counts as a neighbour at 0.
        squared[local, local + start] = float("inf")
        nearest, index = torch.topk(squared, neighbours, dim=1, largest=False, sorted=False)
        near = nearest < _NEAR_PAIR_FRACTION * (squared_norms[start:stop].unsqueeze(1) + squared_norms[index])
        if near.any():
            query_pos, neighbour_pos = near.nonzero(as_tuple=True)
            difference = queries[query_pos] - centred[index[query_pos, neighbour_pos]]
            nearest[query_pos, neighbour_pos] = (difference * difference).sum(dim=1)
        mean_distance[start:stop] = nearest.sqrt_().mean(dim=1)
    return mean_distance


def class_diversity(read: Callable[[int, int], Tensor], num_rows: int, k: int, block_rows: int = 8192) -> Tensor:
    """Sample Diversity Score of one class read in blocks: ``read(start, stop)`` gives rows ``[start, stop)`` of
    the class as a ``[stop - start, d]`` float tensor.

    A class of at most ``block_rows`` rows is read whole and scored as :func:`sample_diversity` scores it (the same
    numbers). A larger one (say 3M rows) is never held: queries and keys both go ``block_rows`` at a time, the k
    nearest so far kept per query, so memory is about ``4 * block_rows**2`` bytes of distances plus two blocks of
    features, whatever the class's size; time grows with ``num_rows**2`` (recipes/benchmarks/README.md, "Scale").

    Returns:
        ``[num_rows]`` float32, ``>= 0``; a class of one row gets 0.0.
    """
    block_rows = max(block_rows, 2)
    if num_rows < 2:
        return torch.zeros(num_rows, dtype=torch.float32)
    if num_rows <= block_rows:
        return _class_knn_mean_distance(read(0, num_rows).to(torch.float32), k, None)
    return _streamed_knn_mean_distance(read, num_rows, k, block_rows)


def _streamed_knn_mean_distance(read: Callable[[int, int], Tensor], num_rows: int, k: int, block_rows: int) -> Tensor:
    """:func:`_class_knn_mean_distance` with the keys in blocks too (two passes: the class mean, then the kNN)."""
    neighbours = min(k, num_rows - 1)
    starts = range(0, num_rows, block_rows)
    total = sum(read(start, min(start + block_rows, num_rows)).to(torch.float64).sum(dim=0) for start in starts)
    mean = (total / num_rows).to(torch.float32)

    def centred(start: int) -> tuple[Tensor, Tensor]:
        block = read(start, min(start + block_rows, num_rows)).to(torch.float32) - mean
        return block, (block * block).sum(dim=1)

    mean_distance = torch.empty(num_rows, dtype=torch.float32)
    for query_start in starts:
        queries, query_norms = centred(query_start)
        best = None
        for key_start in starts:
            keys, key_norms = queries, query_norms
            if key_start != query_start:
                keys, key_norms = centred(key_start)
            squared = torch.addmm(key_norms.unsqueeze(0), queries, keys.T, alpha=-2.0)
            squared.add_(query_norms.unsqueeze(1)).clamp_(min=0.0)
            if key_start == query_start:  # self excluded by index, as in the whole-class path
                local = torch.arange(queries.shape[0])
                squared[local, local] = float("inf")
            nearest, index = torch.topk(squared, min(neighbours, keys.shape[0]), dim=1, largest=False, sorted=False)
            near = nearest < _NEAR_PAIR_FRACTION * (query_norms.unsqueeze(1) + key_norms[index])
            if near.any():
                query_pos, neighbour_pos = near.nonzero(as_tuple=True)
                difference = queries[query_pos] - keys[index[query_pos, neighbour_pos]]
                nearest[query_pos, neighbour_pos] = (difference * difference).sum(dim=1)
            if best is not None:
                merged = torch.cat([best, nearest], dim=1)
                nearest = torch.topk(merged, min(neighbours, merged.shape[1]), dim=1, largest=False).values
            best = nearest
        stop = query_start + queries.shape[0]
        mean_distance[query_start:stop] = best.sqrt_().mean(dim=1)
    return mean_distance


def sample_diversity(
    image_features: Tensor,
    labels: Tensor,
    k: int,
    valid: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """Sample Diversity Score: mean Euclidean distance to the ``k`` nearest neighbours of the same class.

    Rows are grouped by label (they need not be sorted by class, and classes may differ in size). The features are
    used as given, not L2-normalised, as in the released code. Self is excluded by index, so exact duplicate rows
    are each other's neighbours at distance 0.

    Args:
        image_features: ``[N, d]`` features (any float dtype; distances are computed in float32).
        labels: ``[N]`` integer class labels (any values).
        k: neighbours per row. A class of ``n`` rows with ``n - 1 < k`` uses its ``n - 1`` other rows.
        valid: optional ``[N]`` bool mask. Invalid rows (e.g. images that failed to decode) are neither queries nor
            neighbours.
        chunk_rows: query rows per block. Default: enough rows that a block holds about 2**24 distances, so memory
            stays bounded (about 64 MiB of distances) even for a class of 50,000 rows.

    Returns:
        ``[N]`` float32, ``>= 0``; higher means the sample sits in a sparser part of its class. Invalid rows and the
        only valid row of a class (it has no neighbours) get 0.0.
    """
    if image_features.ndim != 2:
        raise ValueError(f"image_features must be [N, d], got shape {tuple(image_features.shape)}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}.")
    device = image_features.device
    num_rows = image_features.shape[0]
    labels = torch.as_tensor(labels, device=device).long()
    if labels.shape != (num_rows,):
        raise ValueError(f"labels must have shape ({num_rows},), got {tuple(labels.shape)}.")
    valid = _as_valid_mask(valid, num_rows, device)
    features = image_features.detach().to(torch.float32)
    diversity = torch.zeros(num_rows, dtype=torch.float32, device=device)
    for class_rows in group_rows_by_label(labels, valid.nonzero().squeeze(1)):
        if class_rows.numel() < 2:
            continue  # a lone row has no neighbours: 0.0, documented above
        diversity[class_rows] = _class_knn_mean_distance(features[class_rows], k, chunk_rows)
    return diversity


def _as_valid_mask(valid: Tensor | None, num_rows: int, device: torch.device) -> Tensor:
    if valid is None:
        return torch.ones(num_rows, dtype=torch.bool, device=device)
    valid = torch.as_tensor(valid, device=device)
    if valid.dtype != torch.bool or valid.shape != (num_rows,):
        raise ValueError(f"valid must be a bool mask of shape ({num_rows},), got {valid.dtype} {tuple(valid.shape)}.")
    return valid


def min_max(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Min-max normalise ``x`` over the valid rows.

    Returns:
        float32 of ``x``'s shape, in ``[0, 1]`` (order preserved: higher stays higher). Invalid rows get 0.0. When
        every valid row has the same value (max == min) there is nothing to rank by, and valid rows get 0.0 too.
    """
    x = torch.as_tensor(x)
    valid = _as_valid_mask(valid, x.shape[0], x.device)
    normalized = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if not valid.any():
        return normalized
    # float64 for the subtraction and division: a float32 range can be tiny next to the values themselves.
    values = x[valid].to(torch.float64)
    low, high = values.min(), values.max()
    if high > low:
        normalized[valid] = ((values - low) / (high - low)).clamp_(0.0, 1.0).to(torch.float32)
    return normalized


def exact_sum(values: Tensor) -> float:
    """The sum of float ``values``, computed exactly and rounded once, so it does not depend on their order.

    Sorting before summing gives order independence too, at O(N log N); this is O(N): each value is split into
    integer mantissa halves (< 2**26) that are added per binary exponent, where float64 sums of integers stay exact
    for up to 2**26 rows, and the per-exponent sums are combined as Python integers.
    """
    values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    if values.size == 0:
        return 0.0
    if values.size > 2**26 or not np.isfinite(values).all():  # beyond the exact range: fall back to a sorted sum
        return float(np.sort(values).sum())
    mantissas, exponents = np.frexp(values)  # values = mantissas * 2**exponents, 0.5 <= |mantissas| < 1
    integers = np.ldexp(mantissas, 53)  # exact integers, |.| < 2**53
    high = np.floor(integers / 2**26)
    low = integers - high * 2**26
    lowest = int(exponents.min())
    buckets = exponents - lowest
    high_sums = np.bincount(buckets, weights=high)
    low_sums = np.bincount(buckets, weights=low)
    total = sum((int(h) * 2**26 + int(lo)) << shift for shift, (h, lo) in enumerate(zip(high_sums, low_sums)))
    shift = lowest - 53
    return float(Fraction(total) * Fraction(2) ** shift)


def scale_by_mean(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """``scores / mean(scores)``, the mean taken over the valid rows, as a float64 tensor of the same shape.

    This is one term of the reward. When the mean is 0 (e.g. every valid normalised score is 0) the term carries no
    information and is 0 for every row instead of a division by zero. Invalid rows get 0.0.
    """
    scores = torch.as_tensor(scores)
    valid = _as_valid_mask(valid, scores.shape[0], scores.device)
    if bool(valid.all()):  # the common case: no masked gather and scatter (they dominate the cost)
        values = scores.to(torch.float64)
        mean = exact_sum(values) / max(values.numel(), 1)
        return values / mean if mean != 0 else torch.zeros_like(values)
    scaled = torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    values = scores[valid].to(torch.float64)
    if values.numel() == 0:
        return scaled
    # An exactly rounded sum depends only on the multiset of values, not on the row order, so a permutation of the
    # rows yields bit-identical rewards (and so the same selection).
    mean = exact_sum(values) / values.numel()
    if mean != 0:
        scaled[valid] = values / mean
    return scaled


def reward(
    semantic_alignment_normalized: Tensor,
    sample_diversity_normalized: Tensor,
    alpha: float,
    valid: Tensor | None = None,
    diversity_gate: Tensor | None = None,
) -> Tensor:
    """Per-sample reward ``c_i = SAS~_i / mean(SAS~) + alpha * g_i * SDS~_i / mean(SDS~)`` (means over valid rows).

    Args:
        semantic_alignment_normalized: ``[N]`` min-max normalised alignment, in ``[0, 1]``.
        sample_diversity_normalized: ``[N]`` min-max normalised diversity, in ``[0, 1]``.
        alpha: weight of the diversity term, ``>= 0``.
        valid: optional ``[N]`` bool mask of rows that may be selected.
        diversity_gate: optional ``[N]`` bool ``g``: rows that may earn the diversity term (default: all). A
            mislabelled or damaged image is an outlier in the class it claims, so an ungated diversity term pulls
            exactly those rows back in; gating it on alignment stops that.

    Returns:
        ``[N]`` float64; higher is better. Each term is ``>= 0`` with mean 1 over valid rows; a term whose mean is 0
        (every valid value 0) contributes 0 instead of dividing by zero. Invalid rows get ``-inf`` (never selected).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}.")
    alignment = torch.as_tensor(semantic_alignment_normalized)
    diversity = torch.as_tensor(sample_diversity_normalized, device=alignment.device)
    if alignment.shape != diversity.shape or alignment.ndim != 1:
        raise ValueError(f"score shapes differ or are not 1-d: {tuple(alignment.shape)}, {tuple(diversity.shape)}.")
    valid = _as_valid_mask(valid, alignment.shape[0], alignment.device)
    diversity_term = scale_by_mean(diversity, valid)
    if diversity_gate is not None:
        diversity_term = diversity_term * torch.as_tensor(diversity_gate, device=alignment.device).to(torch.float64)
    rewards = scale_by_mean(alignment, valid) + float(alpha) * diversity_term
    return rewards.masked_fill_(~valid, float("-inf"))
