"""Near-duplicate search, and the groups it joins (the ``duplicate`` score, hf_clipsel.scores).

Two images are near-duplicates when their pixel *thumbnails* (hf_clipsel.thumbnails: grey levels averaged over an 8x8
grid, measured while embedding) have cosine at least :data:`THUMBNAIL_SIMILARITY` after each grid's mean is removed,
and the *centred cosine* of their image features (the cosine of the L2-normalised features after the mean of the
usable rows' normalised features is subtracted, normalised again) is at least :data:`FEATURE_AGREEMENT`. Without
thumbnails (inputs built by hand), the centred feature cosine alone decides, at :data:`DUPLICATE_SIMILARITY`. The
thumbnail is what finds copies: a weak CLIP puts distinct look-alikes closer than its re-encoded or recoloured
copies, while an area-average grid is unchanged by re-encoding, resizing and channel gains (it is changed by a
shifted crop); the features keep apart distinct images of the same layout. Each row is compared with

- every other row of its *given* class (exact: the nearest same-class neighbour), and
- the rows of other given classes that the model puts in the same *predicted* class: a copy of an image has nearly
  the same features, so it lands in the same predicted class as the original almost always (measured:
  recipes/benchmarks/bench_duplicates.py), whatever label either carries. Only the rows outside a predicted class's
  most common label are queries there (every pair of two labels has one).

Cost: the search compares every pair of thumbnails of a class (sum over classes of n_c^2 x 64), then the m rows of
each predicted class outside its common label with all of its n_p rows (sum of m_p x n_p x 64), with a row max
instead of a top-k; the features are read once for the mean (and the predicted classes, N x C x d, unless the score
stage gives them) and again for the pairs found. Without thumbnails both passes are n^2 on a :data:`SKETCH_DIM`-
dimensional random projection of the features. Both run blockwise (at most 2**24 similarities held at once) and keep
at most :data:`EDGES_PER_ROW` pairs per row, so memory is O(N) beyond one group's thumbnails (time: recipes/
benchmarks/bench_selection.py --parts 5). At ImageNet-21k shape (13M rows, 21k classes, ~620 rows a class) the first
pass is about 13M x 620 x 64 multiply-adds (~5e11, minutes on a CPU). A group of more than :data:`GROUP_ROWS` rows (a
class of millions, or a predicted class where a model piles many rows of other labels) is searched in k-means cells
of about that many rows (hf_clipsel.partition, SemDeDup's partition), so no row is compared with more than about
:data:`GROUP_ROWS` others: the search's time is linear in N whatever the groups' sizes, at the price of the copies
that a cell boundary separates.

*Cropped copies* (``crop_thumbnails``: scoring's ``duplicate_crops``, off by default): each row's nearest row by
thumbnail cosine (the row maximum the passes find anyway) is a candidate from :data:`CROP_CANDIDATE` on, and joins
it when their features agree and their boxes align (hf_clipsel.thumbnails) at :data:`CROP_SIMILARITY`.

Pairs that pass are joined into groups: a centre and the rows paired with it directly (:func:`groups_of_pairs`; not
connected components, which chain look-alikes); a group's id is its smallest row id.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .duplicate_groups import NONE, groups_of_pairs, nearest_partner
from .features import Share, class_assignment, rows_per_block
from .partition import cells
from .scoring import group_rows_by_label
from .thumbnails import crop_alignment, thumbnail_vectors

# Without thumbnails: centred cosine of two image features at or above which two rows are near-duplicates. Measured
# with recipes/benchmarks/bench_duplicates.py on the proxy CLIP (README there): exact, JPEG and resized copies found
# at recall >= 0.9; below it, distinct images of that weak model join groups (pair precision 0.52 at 0.99).
DUPLICATE_SIMILARITY = 0.99
# Cosine of two zero-mean thumbnails at or above which two rows may be near-duplicates. Measured on the benchmark's
# pool: copies scored >= 0.979 (resized), >= 0.999 (JPEG, colour gains); the closest of 4.5M distinct CIFAR-10 pairs
# 0.974 (a real near-duplicate). At 0.97 with the agreement below: pair precision 0.99, recall 0.97-1.00 for exact,
# JPEG, resized and colour-shifted copies, 0.03 for crops.
THUMBNAIL_SIMILARITY = 0.97
# Centred feature cosine such a pair also needs: distinct images of the same layout do not pass (pair precision 0.93
# without it at thumbnail cosine 0.95, 0.95 with it); low, as a weak model scored one colour copy at 0.41.
FEATURE_AGREEMENT = 0.7
CROP_CANDIDATE = 0.6  # crop candidates: nearest-row thumbnail cosine from this up (a crop's: down to 0.56 on the pool)
# Alignment score in [-1, 1] at which they join (0.97 / 0.7 / 0.96: crops R 0.90, P 1.00; conflicts P 0.98, R 0.90).
CROP_SIMILARITY = 0.96
# Pairs above the threshold kept per row: bounds the edges at N x 8 even where many rows are alike (blank images).
EDGES_PER_ROW = 8
# Features wider than this are searched on a seeded random projection to this many dimensions (Johnson-Lindenstrauss:
# 1 - cosine kept within about +-25% at 32 dimensions). Pairs whose projected 1 - cosine is within SKETCH_SLACK times
# the threshold's are candidates, and every cosine reported or compared with the threshold is then computed on the
# full features: the projection only decides which pairs are looked at.
SKETCH_DIM = 32
SKETCH_SLACK = 4.0
# Similarities held at once per block: 2**24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24
# A class (or predicted class) of more rows than this is searched in cells of about this many rows
# (partition.cells), so the search costs at most N x GROUP_ROWS comparisons, not the sum of its groups' squares: a
# model that puts a tenth of a dataset in one predicted class, or a class of 3M rows, would otherwise cost hours.
# Above ImageNet's classes (1,300 rows) and CIFAR-10's (5,000), so their searches are whole.
GROUP_ROWS = 8192


def nearest_in_group(
    features: Tensor,
    labels: Tensor | None,
    threshold: float,
    sketch: Tensor | None = None,
    edges_per_row: int = EDGES_PER_ROW,
    nearest_from: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's most similar other row of one group, and the pairs at or above ``threshold``.

    Args:
        features: ``[n, d]`` L2-normalised float32 features of the group's rows.
        labels: ``[n]`` labels: only rows of *other* labels are candidates (None: every other row is).
        threshold: cosine in ``[-1, 1]`` at or above which a pair is returned.
        sketch: ``[d, s]`` projection (s < d) to search on: the nearest row and the pairs above a looser bound
            (:data:`SKETCH_SLACK`) are found there, at s/d of the cost, and their cosines computed on ``features``.
            None: the search runs on ``features``.
        edges_per_row: at most this many pairs per row (its most similar ones).
        nearest_from: the nearest row's position also for the rows whose nearest is at least this similar (crop
            candidates), not only near ``threshold``.

    Returns:
        ``(similarity, neighbour, pairs)``: ``[n]`` float32 cosine in ``[-1, 1]`` of the most similar candidate
        (-1 where there is none; with a sketch, the projection's cosine for a row with no candidate within the slack,
        and the full features' for the others), ``[n]`` int64 its position in the group (-1: none, or not near
        ``threshold`` nor ``nearest_from``), ``[m, 2]`` int64 positions of the pairs at or above ``threshold``.
    """
    num_rows = features.shape[0]
    similarity = torch.full((num_rows,), -1.0)
    neighbour = torch.full((num_rows,), NONE, dtype=torch.int64)
    pairs = [torch.zeros((0, 2), dtype=torch.int64)]
    if num_rows < 2:
        return similarity, neighbour, pairs[0]
    searched = features if sketch is None else F.normalize(features @ sketch, dim=-1)
    bound = threshold if sketch is None else 1.0 - SKETCH_SLACK * (1.0 - threshold)
    block = max(1, _BLOCK_ELEMENTS // num_rows)
    for start in range(0, num_rows, block):
        stop = min(start + block, num_rows)
        cosines = searched[start:stop] @ searched.T
        local = torch.arange(stop - start)
        cosines[local, local + start] = -torch.inf  # self excluded by index, so an exact copy still counts
        if labels is not None:
            cosines.masked_fill_(labels[start:stop, None] == labels[None, :], -torch.inf)
        # The row maxima alone are cheap (with their indices, 18x dearer); indices, pairs and exact cosines only for
        # rows near a duplicate (or a crop candidate: nearest_from).
        best = cosines.amax(dim=1)
        near = (best >= bound).nonzero().squeeze(1)
        indexed = near if nearest_from is None else (best >= min(bound, nearest_from)).nonzero().squeeze(1)
        index = torch.full((stop - start,), NONE, dtype=torch.int64)
        index[indexed] = cosines[indexed].argmax(dim=1)
        query, candidate = (cosines[near] >= bound).nonzero(as_tuple=True)
        if query.numel() > edges_per_row * near.numel():  # many alike rows (blank images): each row's closest only
            top, nearest = torch.topk(cosines[near], min(edges_per_row, num_rows - 1), dim=1)
            query, rank = (top >= bound).nonzero(as_tuple=True)
            candidate = nearest[query, rank]
        query = near[query]
        if sketch is not None:  # the cosines on the full features
            best[near] = (features[near + start] * features[index[near]]).sum(dim=1)
            keep = (features[query + start] * features[candidate]).sum(dim=1) >= threshold
            query, candidate = query[keep], candidate[keep]
        found = torch.isfinite(best)
        similarity[start:stop] = torch.where(found, best.clamp(-1.0, 1.0), -1.0)
        neighbour[start:stop] = torch.where(found, index, NONE)  # -1 too for a row with no candidate near it
        pairs.append(torch.stack([query + start, candidate], dim=1))
    return similarity, neighbour, torch.cat(pairs)


def nearest_across(
    vectors: Tensor,
    labels: Tensor,
    threshold: float,
    edges_per_row: int = EDGES_PER_ROW,
    nearest_from: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`nearest_in_group` with ``labels`` (each row's most similar row of *another* label, and those pairs at
    or above ``threshold``) without a sketch, at a fraction of its cost: every pair of two labels has a row outside
    the group's most common label (in a predicted class, the rows the model puts in another class than their
    own), so only those m rows are queries: m x n similarities instead of n x n. The other rows' nearest is the
    column maximum over them.

    Returns:
        As :func:`nearest_in_group` (``nearest_from`` too): ``[n]`` cosine of the nearest row of another label (-1:
        none), ``[n]`` its position (-1: none, or not near ``threshold`` nor ``nearest_from``), ``[m, 2]``
        positions of the pairs at or above ``threshold``.
    """
    num_rows = vectors.shape[0]
    similarity = torch.full((num_rows,), -1.0)
    neighbour = torch.full((num_rows,), NONE, dtype=torch.int64)
    pairs = [torch.zeros((0, 2), dtype=torch.int64)]
    values, counts = torch.unique(labels, return_counts=True)
    common = labels == values[counts.argmax()]
    queries = (~common).nonzero().squeeze(1)
    if queries.numel() == 0:
        return similarity, neighbour, pairs[0]
    indexed_from = threshold if nearest_from is None else min(threshold, nearest_from)
    column_best = torch.full((num_rows,), -torch.inf)
    column_index = torch.full((num_rows,), NONE, dtype=torch.int64)
    block = max(1, _BLOCK_ELEMENTS // num_rows)
    for start in range(0, queries.numel(), block):
        rows = queries[start : start + block]
        cosines = vectors[rows] @ vectors.T
        cosines.masked_fill_(labels[rows, None] == labels[None, :], -torch.inf)  # itself too
        # Maxima alone, as in nearest_in_group: their positions (18x dearer) only where a row or column is near.
        best = cosines.amax(dim=1)
        index = torch.full((rows.numel(),), NONE, dtype=torch.int64)
        indexed = (best >= indexed_from).nonzero().squeeze(1)
        index[indexed] = cosines[indexed].argmax(dim=1)
        found = torch.isfinite(best)
        similarity[rows] = torch.where(found, best.clamp(-1.0, 1.0), -1.0)
        neighbour[rows] = torch.where(found, index, NONE)
        column = cosines.amax(dim=0)
        better = column > column_best
        column_best = torch.where(better, column, column_best)
        column_index.masked_fill_(better, NONE)  # a better maximum elsewhere: the old position is stale
        indexed = (better & (column >= indexed_from)).nonzero().squeeze(1)
        column_index[indexed] = rows[cosines[:, indexed].argmax(dim=0)]
        near = (best >= threshold).nonzero().squeeze(1)
        query, candidate = (cosines[near] >= threshold).nonzero(as_tuple=True)
        if query.numel() > edges_per_row * near.numel():  # many alike rows (blank images): each row's closest only
            top, nearest = torch.topk(cosines[near], min(edges_per_row, num_rows - 1), dim=1)
            query, rank = (top >= threshold).nonzero(as_tuple=True)
            candidate = nearest[query, rank]
        pairs.append(torch.stack([rows[near[query]], candidate], dim=1))
    found = common & torch.isfinite(column_best)
    similarity[found], neighbour[found] = column_best[found].clamp(-1.0, 1.0), column_index[found]
    return similarity, neighbour, torch.cat(pairs)


def find_duplicates(
    image_features: Tensor,
    class_features: Tensor,
    labels: Tensor,
    valid: Tensor,
    threshold: float | None = None,
    share: Share | None = None,
    thumbnails: Tensor | None = None,
    feature_agreement: float = FEATURE_AGREEMENT,
    crop_thumbnails: Tensor | None = None,
    crop_similarity: float = CROP_SIMILARITY,
    predicted_classes: Tensor | None = None,
    group_rows: int = GROUP_ROWS,
) -> dict[str, np.ndarray]:
    """Nearest neighbours within and across classes, and the near-duplicate groups, of every usable row.

    With ``thumbnails``, rows are compared by their pixel thumbnails, and a pair at or above ``threshold`` is a
    near-duplicate when the centred cosine of its image features is also at least ``feature_agreement``; without,
    by the centred cosine of their image features alone. Features are read one class (then one predicted class) at
    a time, as ``image_features[rows]``. With ``share``, the processes split the classes (by
    :func:`~hf_clipsel.features.class_assignment`) and gather the results: every process gets the same values as
    one process alone.

    Args:
        image_features: ``[N, d]`` image features (any float dtype; not necessarily normalised).
        class_features: ``[C, d]`` L2-normalised class text features: they give each row's predicted class, unless
            ``predicted_classes`` (``[N]``, the score stage's: at 1000 classes this search's costliest product) does.
        labels: ``[N]`` int64 given labels in ``[0, C)``.
        valid: ``[N]`` bool usable rows; the others are neither queries nor candidates.
        threshold: cosine in ``[-1, 1]`` at or above which two rows are near-duplicates (of the thumbnails with
            ``thumbnails``, else of the features); default :data:`THUMBNAIL_SIMILARITY` or
            :data:`DUPLICATE_SIMILARITY`.
        share: this process's part of the work (default: all of it).
        thumbnails: ``[N, 64]`` 8x8 grids (hf_clipsel.thumbnails; any number type), or None: a tensor, or
            anything that reads them by row ids as one (``thumbnails[rows]``: the score stage's
            :class:`~hf_clipsel.features.FeatureStore` of them, read a class at a time).
        feature_agreement: centred feature cosine in ``[-1, 1]`` a thumbnail pair needs too.
        crop_thumbnails: ``[N, 256]`` 16x16 grids (read as ``thumbnails`` is), or None: crops are not searched.
        crop_similarity: alignment score in ``[-1, 1]`` at or above which a crop candidate is a near-duplicate.
        group_rows: a class or predicted class of more rows is searched in cells of about this many rows
            (:func:`hf_clipsel.partition.cells`).

    Returns:
        ``same_class`` / ``other_class``: float32 ``[N]`` cosine (of the thumbnails, or of the features) of the
        nearest usable row of the same class / of another class in the same predicted class (-1 where there is
        none); ``group``: int64 ``[N]`` the smallest row id of the row's near-duplicate group (-1: none);
        ``nearest``: int64 ``[N]`` the row id of its most similar near-duplicate, either class (-1: none).
    """
    if threshold is None:
        threshold = DUPLICATE_SIMILARITY if thumbnails is None else THUMBNAIL_SIMILARITY
    num_rows = labels.shape[0]
    same_class = torch.full((num_rows,), -1.0)
    other_class = torch.full((num_rows,), -1.0)
    # [N] arrays are what grows with N here (ImageNet-21k: 13M rows), so each is as narrow as its values allow: row
    # ids and classes fit int32 below 2**31, and the nearest row of each side is only needed without thumbnails
    # (with them, the nearest partner comes from the pairs found).
    index_dtype = torch.int32 if num_rows < 2**31 else torch.int64
    same_row = other_row = None
    if thumbnails is None:
        same_row = torch.full((num_rows,), NONE, dtype=index_dtype)
        other_row = torch.full((num_rows,), NONE, dtype=index_dtype)
    predicted = torch.full((num_rows,), NONE, dtype=torch.int32)  # a class index
    text = class_features.to(torch.float32)
    # the usable rows' ids, grouped by class: held through a pass, so int32 too
    classes = group_rows_by_label(labels, valid.nonzero().squeeze(1).to(index_dtype))
    dim = image_features.shape[1]
    share = share or Share()

    # A class is read in blocks of a feature store's pass (BLOCK_BYTES of features): memory bounded by a block, not
    # by the class (one of 3M rows would be 9 GiB at 768-d). A class of one block sums as one read did, bit for bit.
    block_rows = rows_per_block(dim)

    def read_class(rows: Tensor) -> tuple[Tensor, Tensor]:  # its features' sum, and the class the model prefers
        total, preferred = torch.zeros(dim), []
        for start in range(0, rows.numel(), block_rows):
            normalised = F.normalize(image_features[rows[start : start + block_rows]].to(torch.float32), dim=-1)
            total += normalised.sum(dim=0)
            if predicted_classes is None:
                preferred.append((normalised @ text.T).argmax(dim=-1))
        preferred = torch.cat(preferred) if preferred else torch.zeros(0, dtype=torch.int64)
        return total, preferred if predicted_classes is None else predicted_classes[rows]

    # The mean direction of the usable rows: a CLIP's features share a large common component, which puts distinct
    # images at cosines near 1; centred, a copy stays near 1 and distinct images spread out. Summed in class order
    # whatever the processes, so that the mean (and every cosine after it) is the same bits.
    mean = torch.zeros(dim)
    for rows, (total, preferred) in zip(classes, each_group(classes, read_class, share, cost=len)):
        mean += total
        predicted[rows] = preferred.to(predicted.dtype)
    mean /= max(int(valid.sum()), 1)

    generator = torch.Generator().manual_seed(0)  # the same projection every run: the same groups
    sketch = torch.randn(dim, SKETCH_DIM, generator=generator) if dim > SKETCH_DIM else None

    def centred(rows: Tensor) -> Tensor:
        return F.normalize(F.normalize(image_features[rows].to(torch.float32), dim=-1) - mean, dim=-1)

    crops = thumbnails is not None and crop_thumbnails is not None

    def search(
        rows: Tensor, other_labels: Tensor | None, vectors: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if thumbnails is None:
            return nearest_in_group(centred(rows), other_labels, threshold, sketch)
        if vectors is None:
            vectors = thumbnail_vectors(thumbnails[rows])
        if other_labels is None:
            similarity, neighbour, found = nearest_in_group(
                vectors, None, threshold, nearest_from=CROP_CANDIDATE if crops else None
            )
        else:
            similarity, neighbour, found = nearest_across(
                vectors, other_labels, threshold, nearest_from=CROP_CANDIDATE if crops else None
            )
        num_found = len(found)  # candidate crops: each row and its nearest row, close but below the threshold
        if crops:
            query = ((similarity >= CROP_CANDIDATE) & (similarity < threshold) & (neighbour >= 0)).nonzero()[:, 0]
            candidates = torch.stack([query, neighbour[query]], dim=1).sort(dim=1).values
            found = torch.cat([found, torch.unique(candidates, dim=0)])  # each unordered pair once
        if found.numel():  # the features must agree: distinct images with the same layout do not
            involved, position = torch.unique(found, return_inverse=True)
            features = centred(rows[involved])
            agree = (features[position[:, 0]] * features[position[:, 1]]).sum(dim=1) >= feature_agreement
            found, candidates = found[:num_found][agree[:num_found]], found[num_found:][agree[num_found:]]
            if len(candidates):  # and their crop boxes aligned
                grids = crop_thumbnails[rows[candidates.reshape(-1)]].reshape(len(candidates), 2, -1)
                aligned = crop_alignment(grids[:, 0], grids[:, 1], crop_similarity) >= crop_similarity
                found = torch.cat([found, candidates[aligned]])
        return similarity, neighbour, found

    def descriptors(rows: Tensor) -> Tensor:  # what the search compares, as unit vectors: what cells divide
        if thumbnails is not None:
            return thumbnail_vectors(thumbnails[rows])
        return torch.cat([centred(rows[start : start + block_rows]) @ sketch if sketch is not None
                          else centred(rows[start : start + block_rows])
                          for start in range(0, rows.numel(), block_rows)])  # fmt: skip

    def search_in_cells(rows: Tensor, other_labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if rows.numel() <= group_rows:
            return search(rows, other_labels)
        similarity = torch.full((rows.numel(),), -1.0)
        neighbour = torch.full((rows.numel(),), NONE, dtype=torch.int64)
        found = [torch.zeros((0, 2), dtype=torch.int64)]
        described = descriptors(rows)
        # With thumbnails the descriptors are what a cell's search compares (row by row, the same values): taken
        # from the group's, not read again for each cell (a cell's rows are scattered over the store: a read each).
        reused = thumbnails is not None
        for cell in cells(F.normalize(described, dim=-1), group_rows):
            cell_similarity, cell_neighbour, cell_found = search(
                rows[cell], None if other_labels is None else other_labels[cell], described[cell] if reused else None
            )
            similarity[cell] = cell_similarity
            neighbour[cell] = torch.where(cell_neighbour >= 0, cell[cell_neighbour.clamp(min=0)], NONE)
            found.append(cell[cell_found])
        return similarity, neighbour, torch.cat(found)

    def cost(rows: Tensor) -> int:  # comparisons of a group's search
        return len(rows) * min(len(rows), group_rows)

    pairs = []
    for rows, (similarity, neighbour, found) in zip(
        classes, each_group(classes, lambda rows: search_in_cells(rows, None), share, cost)
    ):
        same_class[rows] = similarity
        if same_row is not None:
            same_row[rows] = _row_ids(rows, neighbour).to(same_row.dtype)
        pairs.append(rows[found])
    del classes  # the given classes' row ids (4 bytes a row): the predicted classes' take their place
    predicted_groups = group_rows_by_label(predicted, valid.nonzero().squeeze(1).to(index_dtype))
    for rows, (similarity, neighbour, found) in zip(
        predicted_groups, each_group(predicted_groups, lambda rows: search_in_cells(rows, labels[rows]), share, cost)
    ):
        other_class[rows] = similarity
        if other_row is not None:
            other_row[rows] = _row_ids(rows, neighbour).to(other_row.dtype)
        pairs.append(rows[found])
    del predicted_groups, predicted
    pairs = torch.cat(pairs) if pairs else torch.zeros((0, 2), dtype=torch.int64)
    if thumbnails is None:
        nearest_is_same = same_class >= other_class
        best = torch.where(nearest_is_same, same_class, other_class)
        nearest = torch.where(best >= threshold, torch.where(nearest_is_same, same_row, other_row), NONE)
        nearest = nearest.to(torch.int64).numpy()
    else:  # the most similar row it is joined to (a closer one may have failed the features' check)
        vectors = thumbnail_vectors(thumbnails[pairs.flatten()]).reshape(len(pairs), 2, thumbnails.shape[1])
        nearest = nearest_partner(pairs.numpy(), (vectors[:, 0] * vectors[:, 1]).sum(dim=1).numpy(), num_rows)
    return {
        "same_class": same_class.numpy(),
        "other_class": other_class.numpy(),
        "group": groups_of_pairs(pairs.numpy(), num_rows),
        "nearest": nearest,
    }


def each_group(groups: list[Tensor], function, share: Share, cost=lambda rows: len(rows) ** 2) -> Iterable:
    """``function(rows)`` for each of ``groups``, in ``groups`` order, each group computed by one process of
    ``share`` (longest processing time first on ``cost``: a search's comparisons) and the results gathered on every
    one. One process: a generator, so that one group's results are held at a time, not every row's at once."""
    if share.num_processes == 1:
        return (function(rows) for rows in groups)
    costs = np.array([cost(rows) for rows in groups], dtype=np.float64)
    mine = class_assignment(costs, share.num_processes)[share.process_index]
    results: list = [None] * len(groups)
    for index, result in share.gather([(index, function(groups[index])) for index in mine]):
        results[index] = result
    return results


def _row_ids(rows: Tensor, positions: Tensor) -> Tensor:
    """The row ids of ``positions`` in a group of ``rows`` (-1 stays -1)."""
    return torch.where(positions >= 0, rows[positions.clamp(min=0)], NONE)
