"""The near-duplicate groups that a search's pairs join (hf_clipsel.duplicates), and each row's closest partner."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix

NONE = -1  # no neighbour, no partner, no group


def nearest_partner(pairs: np.ndarray, similarity: np.ndarray, num_rows: int) -> np.ndarray:
    """int64 ``[num_rows]``: each row's partner in its most similar pair of ``pairs`` (``[m, 2]`` row ids, with
    ``similarity`` ``[m]``); ties: the lowest row id; -1 for a row in no pair."""
    nearest = np.full(num_rows, NONE, dtype=np.int64)
    rows, partners = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    order = np.lexsort((partners, -np.r_[similarity, similarity], rows))
    first = np.r_[True, rows[order][1:] != rows[order][:-1]] if len(order) else np.zeros(0, dtype=bool)
    nearest[rows[order][first]] = partners[order][first]
    return nearest


def groups_of_pairs(pairs: np.ndarray, num_rows: int) -> np.ndarray:
    """int64 ``[num_rows]``: near-duplicate groups of ``pairs`` (``[m, 2]`` row ids), each a *centre* and the rows
    paired with it directly. Not connected components: look-alikes each close to the next (the "1"s of a digits
    set) would chain into one group of many labels, none of them a copy of the others. Centres are taken most-paired
    first (ties: the lowest row id) among the rows not yet grouped; a group's id is its smallest row id; -1 for a row
    in no pair, or whose partners all joined other groups."""
    group = np.full(num_rows, NONE, dtype=np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]] if len(pairs) else pairs
    if len(pairs) == 0:
        return group
    ones = np.ones(2 * len(pairs), dtype=np.int8)
    both = (np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]])
    graph = coo_matrix((ones, both), shape=(num_rows, num_rows)).tocsr()  # symmetric; repeated pairs summed
    degree = np.diff(graph.indptr)
    grouped = np.zeros(num_rows, dtype=bool)
    # the paired rows only: a sort of all N rows (and its [N] keys) would cost more than the pairs at 13M rows
    paired = np.flatnonzero(degree)
    for centre in paired[np.lexsort((paired, -degree[paired]))]:
        if grouped[centre]:
            continue
        partners = graph.indices[graph.indptr[centre] : graph.indptr[centre + 1]]
        members = np.r_[centre, partners[~grouped[partners]]]
        if len(members) > 1:
            grouped[members] = True
            group[members] = members.min()
    return group
