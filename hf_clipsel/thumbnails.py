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


def crop_views(grids: Tensor) -> Tensor:
    """``[n, K, THUMBNAIL_SIDE**2]`` zero-mean unit vectors: the K crop boxes of each :data:`CROP_SIDE` grid
    (``[n, CROP_SIDE**2]``, any number type), each resampled to :data:`THUMBNAIL_SIDE` x :data:`THUMBNAIL_SIDE`;
    the last is the whole image. Two matrix products a box scale (about 50k multiply-adds a row)."""
    num_rows, compare = grids.shape[0], THUMBNAIL_SIDE
    grids = grids.to(torch.float32).reshape(num_rows, CROP_SIDE, CROP_SIDE)
    across = grids @ torch.cat(_RESAMPLERS).T  # [n, y, every box's x values]: one product for every scale
    views, start = [], 0
    for (_, places), resampler in zip(_BOXES, _RESAMPLERS):
        width = places * compare
        # [n, x, y] @ [y, places * compare]: the second axis, as one product of n * width rows
        both = across[:, :, start : start + width].transpose(1, 2) @ resampler.T
        start += width
        both = both.reshape(num_rows, places, compare, places, compare).permute(0, 3, 1, 4, 2)
        views.append(both.reshape(num_rows, places * places, compare * compare))
    views = torch.cat(views, dim=1)
    views -= views.mean(dim=-1, keepdim=True)
    return F.normalize(views, dim=-1, out=views)


def crop_alignment(views: Tensor, pairs: Tensor) -> Tensor:
    """``[m]`` alignment score of each of ``pairs`` (``[m, 2]`` positions in ``views``, :func:`crop_views`): the
    best cosine of one row's boxes with the other's whole image, either way, in ``[-1, 1]``."""
    first, second = views[pairs[:, 0]], views[pairs[:, 1]]
    forward = (first @ second[:, -1, :, None]).amax(dim=(1, 2))
    backward = (second @ first[:, -1, :, None]).amax(dim=(1, 2))
    return torch.maximum(forward, backward)
