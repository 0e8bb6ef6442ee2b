"""The pixel thumbnails the duplicate score compares (hf_clipsel.duplicates): grey-level grids of the whole image,
measured while embedding, and the crop boxes of the finer one that the crop search aligns.

A grid is an area average, so a resized or re-encoded copy gives nearly the same one, and grids are compared after
their mean is removed, so a uniform brightness or colour change does not count. A crop of 85-95% at a random place
shifts and rescales the grid; :func:`crop_views` cuts boxes of those sizes and places from the finer grid, each
resampled to the coarse grid's side, and :func:`crop_alignment` finds the box of one image that matches the other's
whole grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# The thumbnail's grid side (64 values a row, 64 bytes in the cache).
THUMBNAIL_SIDE = 8
# The crop search's finer grid (256 values a row) and its boxes: CROP_SCALES of each side at CROP_PLACES x
# CROP_PLACES places, and the whole image (28 boxes), each resampled to THUMBNAIL_SIDE x THUMBNAIL_SIDE.
CROP_SIDE = 16
CROP_SCALES = (0.85, 0.9, 0.95)
CROP_PLACES = 3
# Pairs whose views are cut and compared at once (crop_alignment): their views (2 x 7 KiB a pair) stay in the caches.
CROP_CHUNK_ROWS = 1024


def thumbnail(image: Image.Image | None, side: int = THUMBNAIL_SIDE) -> list[int]:
    """The pixel descriptor of one decoded RGB image: its grey levels averaged over a ``side`` x ``side`` grid of the
    whole image (``side**2`` ints in ``[0, 255]``, row-major; :data:`THUMBNAIL_SIDE`, or :data:`CROP_SIDE` for the
    crop search's). An area average, so a resized or re-encoded copy gives nearly the same grid, and the search
    compares grids after removing their mean, so a uniform brightness or colour change does not count. ``None`` (an
    image that did not decode): zeros."""
    if image is None:
        return [0] * side**2
    grey = image.convert("L").resize((side, side), Image.Resampling.BOX)
    return list(grey.tobytes())


def thumbnail_vectors(thumbnails: Tensor) -> Tensor:
    """``[n, side**2]`` float32 unit vectors of :func:`thumbnail` grids after their mean is removed (a blank grid:
    zeros, near-duplicate of nothing)."""
    grids = thumbnails.to(torch.float32, copy=True)  # centred and scaled in place: one [n, 64] copy, not three
    grids -= grids.mean(dim=1, keepdim=True)
    return F.normalize(grids, dim=-1, out=grids)


def _resamplers(scale: float, places: int, side: int = CROP_SIDE, compare: int = THUMBNAIL_SIDE) -> Tensor:
    """``[places * compare, side]``: spans of ``scale`` times a ``side``-long axis at ``places`` evenly spread
    places, each resampled to ``compare`` values (bilinear at twice that, then pairs averaged: an area average, as
    the thumbnail is). A box's view of a grid is ``R_y @ grid @ R_x.T``: bilinear sampling and the 2x2 average are
    separable, so the two 1-D maps give the 2-D box (a ninth of the multiply-adds of a [side**2, 64] map a box)."""
    points = (2 * torch.arange(2 * compare) + 1) / (2 * compare) - 1  # sample centres (align_corners=False)
    centres = torch.linspace(-(1 - scale), 1 - scale, places) if places > 1 else torch.zeros(1)
    x = (scale * points[None, :] + centres[:, None]).reshape(-1)
    grid = torch.stack([x, torch.zeros_like(x)], dim=-1).expand(side, 1, -1, 2)  # one basis row per input value
    basis = torch.eye(side).reshape(side, 1, 1, side)
    sampled = F.grid_sample(basis, grid, align_corners=False).reshape(side, places * compare, 2)
    return sampled.mean(dim=-1).T.contiguous()


# (scale, places) of the boxes, the whole image last: 3 x 9 + 1 = 28 boxes
_BOXES = [(scale, CROP_PLACES) for scale in CROP_SCALES] + [(1.0, 1)]
_RESAMPLERS = [_resamplers(scale, places) for scale, places in _BOXES]
ALL_BOXES = tuple(range(len(_BOXES)))
# The screen's boxes (crop_alignment): the middle scale's places and the whole image, 10 of the 28 boxes at about a
# third of the multiply-adds. A subset, so its score is a lower bound of the full one. On bench_duplicates.py's pool
# (1,265 candidate pairs, 34 of them crops): every pair at >= 0.96 in full scored >= 0.935 on the screen; the
# screen's threshold (the full one less CROP_SCREEN_SLACK) passed 12-17% of the candidates on to the full boxes.
SCREEN_BOXES = (CROP_SCALES.index(0.9), len(_BOXES) - 1)
CROP_SCREEN_SLACK = 0.07
# What a pair that passes the screen is cut into next: the other scales (and the whole image, which every set ends
# with); the best of both sets is the best of all 28 boxes.
_REST_BOXES = tuple(box for box in ALL_BOXES if box not in SCREEN_BOXES) + (len(_BOXES) - 1,)


def crop_views(grids: Tensor, boxes: tuple[int, ...] = ALL_BOXES) -> Tensor:
    """``[n, K, THUMBNAIL_SIDE**2]`` zero-mean unit vectors: the K crop boxes of each :data:`CROP_SIDE` grid
    (``[n, CROP_SIDE**2]``, any number type), each resampled to :data:`THUMBNAIL_SIDE` x :data:`THUMBNAIL_SIDE`;
    the last is the whole image. ``boxes``: which (scale, places) sets of ``_BOXES`` (default all: K = 28; the
    whole image's must be last). Two matrix products a box scale (about 50k multiply-adds a row for all)."""
    num_rows, compare = grids.shape[0], THUMBNAIL_SIDE
    grids = grids.to(torch.float32).reshape(num_rows, CROP_SIDE, CROP_SIDE)
    across = grids @ torch.cat([_RESAMPLERS[box] for box in boxes]).T  # [n, y, every box's x values]: one product
    views, start = [], 0
    for box in boxes:
        (_, places), resampler = _BOXES[box], _RESAMPLERS[box]
        width = places * compare
        # [n, x, y] @ [y, places * compare]: the second axis, as one product of n * width rows
        both = across[:, :, start : start + width].transpose(1, 2) @ resampler.T
        start += width
        both = both.reshape(num_rows, places, compare, places, compare).permute(0, 3, 1, 4, 2)
        views.append(both.reshape(num_rows, places * places, compare * compare))
    views = torch.cat(views, dim=1)
    views -= views.mean(dim=-1, keepdim=True)
    return F.normalize(views, dim=-1, out=views)


def _aligned(first: Tensor, second: Tensor, boxes: tuple[int, ...], chunk_rows: int) -> Tensor:
    alignment = torch.empty(len(first))
    for start in range(0, len(first), chunk_rows):
        one = crop_views(first[start : start + chunk_rows], boxes)
        other = crop_views(second[start : start + chunk_rows], boxes)
        # products and sums, not a batched matrix product: m products of [K, 64] by [64] are 4x slower as a bmm
        forward = (one * other[:, -1:]).sum(dim=-1).amax(dim=1)
        backward = (other * one[:, -1:]).sum(dim=-1).amax(dim=1)
        alignment[start : start + chunk_rows] = torch.maximum(forward, backward)
    return alignment


def crop_alignment(
    first: Tensor, second: Tensor, at_least: float | None = None, chunk_rows: int = CROP_CHUNK_ROWS
) -> Tensor:
    """``[m]`` alignment score of each pair of :data:`CROP_SIDE` grids (``first[i]`` with ``second[i]``, ``[m,
    CROP_SIDE**2]`` each, any number type): the best cosine of one grid's boxes (:func:`crop_views`) with the other's
    whole image, either way, in ``[-1, 1]``.

    With ``at_least`` (the threshold the caller compares with), the pairs are screened first on
    :data:`SCREEN_BOXES`: a pair below ``at_least - CROP_SCREEN_SLACK`` there keeps its screen score (a lower bound
    of the full one) and is not cut into the other 18 (most candidates are distinct images, and stop there). The
    pairs go ``chunk_rows`` at a time, views cut and compared at once (all of them at once would be 7 KiB a row
    written out and gathered back, memory traffic that cost more than the arithmetic)."""
    if at_least is None:
        return _aligned(first, second, ALL_BOXES, chunk_rows)
    alignment = _aligned(first, second, SCREEN_BOXES, chunk_rows)
    passed = (alignment >= at_least - CROP_SCREEN_SLACK).nonzero()[:, 0]
    if len(passed):
        rest = _aligned(first[passed], second[passed], _REST_BOXES, chunk_rows)
        alignment[passed] = torch.maximum(alignment[passed], rest)
    return alignment
