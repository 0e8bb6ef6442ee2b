"""Cropped copies: can candidates plus an alignment search find them, where one thumbnail threshold does not?

Reads the pool and the default run of bench_duplicates.py (the same flags; built and cached there on first use). The
8x8 thumbnail of a crop of 85-95% at a random place is a shifted, rescaled grid, so its cosine with the original's
falls to 0.56-0.74 while distinct images reach 0.97. Tried here, in two steps:

1. candidates: each row's m nearest rows of its class (and, across labels, of its predicted class) by the 8x8
   thumbnail cosine or by the centred feature cosine (no threshold); printed: how often a copy's original is among
   them, per kind and m;
2. verification of the candidate pairs that pass two cheap pre-filters (8x8 thumbnail cosine >= --prefilter, centred
   feature cosine >= a) by an alignment search on a finer grey thumbnail (side S, what a run would measure while
   embedding): the best normalised cross-correlation of one image's whole grid with the other's crop boxes (--scales
   x --positions places per axis, both directions), each resampled to a C x C grid; a pair is a near-duplicate when
   that score is >= t. Printed: recall and precision per kind and (t, a) as bench_duplicates.py prints them,
   conflicting-label precision and recall, the share of injected groups kept at most once (ESTIMATED: a found group
   is kept at most once, the others as the run's selection kept them), the share of rows verified and the time per
   row;
3. the cost at ImageNet-1k's class shape (synthetic, as bench_selection.py --parts 5): SAS + SDS, today's duplicate
   search, the candidates and the verification of several shares of the rows, per row and as a share of SAS + SDS.

    python recipes/benchmarks/explore_duplicate_crops.py --data_dir /path/to/cifar10 --work_dir /tmp/dup/work \\
        --proxy_epochs 8 --threads 1
"""

from __future__ import annotations

import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import imagenet_class_shape, interleaved, load_average, median
from bench_duplicates import KINDS, RATIOS, conflict_rows, kind_cells, parser, prepare, table
from datasets import Dataset
from PIL import Image
from torch import Tensor

from hf_clipsel import scoring
from hf_clipsel.core.names import selected_column
from hf_clipsel.duplicates import find_duplicates, groups_of_pairs
from hf_clipsel.scoring import group_rows_by_label
from hf_clipsel.thumbnails import thumbnail_vectors


def grey_grids(images, side: int) -> Tensor:
    """float32 ``[n, side, side]``: grey levels of each image averaged over a side x side grid (as
    hf_clipsel.thumbnails.thumbnail, finer)."""
    grids = [np.asarray(image.convert("L").resize((side, side), Image.Resampling.BOX)) for image in images]
    return torch.from_numpy(np.stack(grids).astype(np.float32))


def boxes(scales: list[float], positions: int) -> Tensor:
    """``[K, 2, 3]`` affine maps (torch's normalised coordinates) of square boxes: each scale at positions x
    positions places spanning the image (the whole image once)."""
    thetas = []
    for scale in scales:
        places = [0.0] if scale >= 1.0 else np.linspace(-(1 - scale), 1 - scale, positions)
        for cy in places:
            for cx in places:
                thetas.append([[scale, 0.0, cx], [0.0, scale, cy]])
    return torch.tensor(thetas, dtype=torch.float32)


def box_matrix(thetas: Tensor, side: int, compare: int) -> Tensor:
    """``[side**2, K * compare**2]``: the K boxes of a side x side grid, each resampled to compare x compare
    (bilinear at twice the side, then 2x2 averages: an area average, as the thumbnail is). Linear in the grid, so one
    matrix (the views of the unit grids): a class's views are one matrix product."""
    basis = torch.eye(side * side).reshape(side * side, side, side)
    num_boxes = thetas.shape[0]
    sampling = F.affine_grid(thetas, (num_boxes, 1, 2 * compare, 2 * compare), align_corners=False)
    inputs = basis[:, None].repeat_interleave(num_boxes, dim=0)
    sampled = F.grid_sample(inputs, sampling.repeat(side * side, 1, 1, 1), align_corners=False)
    return F.avg_pool2d(sampled, 2).reshape(side * side, num_boxes * compare * compare)


def matrix_views(grids: Tensor, matrix: Tensor, compare: int) -> Tensor:
    """``[n, K, compare**2]``: the boxes of :func:`box_matrix` of ``grids`` (``[n, side, side]``), as zero-mean unit
    vectors."""
    views = (grids.reshape(grids.shape[0], -1) @ matrix).reshape(grids.shape[0], -1, compare * compare)
    return F.normalize(views - views.mean(dim=-1, keepdim=True), dim=-1)


def alignment_scores(views: Tensor, whole: Tensor, pairs: Tensor, chunk: int = 4096) -> Tensor:
    """``[m]``: for each pair (a, b), the best cosine of a's boxes with b's whole grid and of b's with a's."""
    scores = []
    for start in range(0, pairs.shape[0], chunk):
        a, b = pairs[start : start + chunk, 0], pairs[start : start + chunk, 1]
        forward = (views[a] * whole[b][:, None]).sum(-1).amax(-1)
        backward = (views[b] * whole[a][:, None]).sum(-1).amax(-1)
        scores.append(torch.maximum(forward, backward))
    return torch.cat(scores) if scores else torch.zeros(0)


def top_pairs(vectors: Tensor, groups: list[Tensor], m: int, labels: Tensor | None) -> Tensor:
    """``[k, 2]`` row ids: each row of each group with its m most similar rows of the group (of other labels with
    ``labels``); m = 0: every such pair."""
    pairs = []
    for rows in groups:
        if rows.numel() < 2:
            continue
        similarity = vectors[rows] @ vectors[rows].T
        similarity.fill_diagonal_(-torch.inf)
        if labels is not None:
            similarity.masked_fill_(labels[rows][:, None] == labels[rows][None, :], -torch.inf)
        if m == 0:
            query, candidate = torch.isfinite(similarity).nonzero(as_tuple=True)
        else:
            top, nearest = torch.topk(similarity, min(m, rows.numel() - 1), dim=1)
            query, rank = torch.isfinite(top).nonzero(as_tuple=True)
            candidate = nearest[query, rank]
        pairs.append(torch.stack([rows[query], rows[candidate]], dim=1))
    pairs = torch.cat(pairs) if pairs else torch.zeros((0, 2), dtype=torch.int64)
    return torch.unique(torch.sort(pairs, dim=1).values, dim=0)  # unordered, once


def cost_at_imagenet_shape(args, thetas: Tensor, side: int, compare: int, rows_per_class: int = 1281) -> None:
    """Seconds per row at ImageNet-1k's class shape (synthetic, as bench_selection.py --parts 5 builds it: 512-d
    features near their class centre, random thumbnails): SAS + SDS, today's duplicate search, and what the crop
    search adds: each row's nearest same-class row by 8x8 thumbnail (a pass of its own: an upper bound, as it would
    ride on today's pass), then for a share f of each class's rows (the share of rows in a pair the pre-filters pass,
    measured on the pool above) their features, their box views and one pair each. Interleaved, median."""
    dim, num_classes = 512, args.cost_classes
    generator = torch.Generator().manual_seed(0)
    labels, features, text, valid, small = imagenet_class_shape(num_classes, rows_per_class, generator, dim)
    grids = torch.randint(0, 256, (len(labels), side, side), generator=generator).to(torch.float32)
    matrix, whole_matrix = box_matrix(thetas, side, compare), box_matrix(boxes([1.0], 1), side, compare)
    classes = [torch.arange(c * rows_per_class, (c + 1) * rows_per_class) for c in range(num_classes)]
    mean = F.normalize(features, dim=-1).mean(dim=0)

    def candidates():
        for rows in classes:
            vectors = thumbnail_vectors(small[rows])
            similarity = vectors @ vectors.T
            similarity.fill_diagonal_(-torch.inf)
            similarity.argmax(dim=1)

    def verification(fraction: float):
        def run():  # a share of each class's rows is verified, each against its nearest row of that share
            for rows in classes:
                involved = rows[: max(2, round(fraction * len(rows)))]
                vectors = thumbnail_vectors(small[involved])
                similarity = vectors @ vectors.T
                similarity.fill_diagonal_(-torch.inf)
                pairs = torch.stack([torch.arange(len(involved)), similarity.argmax(dim=1)], dim=1)
                centred = F.normalize(F.normalize(features[involved], dim=-1) - mean, dim=-1)
                (centred[pairs[:, 0]] * centred[pairs[:, 1]]).sum(dim=1)
                views = matrix_views(grids[involved], matrix, compare)
                whole = matrix_views(grids[involved], whole_matrix, compare)[:, 0]
                alignment_scores(views, whole, pairs)

        return run

    variants = {
        "SAS + SDS (K = 50)": lambda: (
            scoring.semantic_alignment(features, text, labels),
            scoring.sample_diversity(features, labels, 50),
        ),
        "duplicate search (today)": lambda: find_duplicates(features, text, labels, valid, thumbnails=small),
        "crop candidates (nearest by 8x8, own pass)": candidates,
    }
    variants.update({f"crop verification of {f:g} of the rows": verification(f) for f in args.cost_fractions})
    print(f"\nCost at ImageNet-1k's class shape: {num_classes} classes x {rows_per_class} rows, S={side}, C={compare}")
    print(load_average())
    times = interleaved(variants, args.repeats)
    base = median(times["SAS + SDS (K = 50)"])
    num_rows = len(labels)
    rows = [
        [name, f"{1e6 * median(t) / num_rows:.2f}", f"{1e6 * min(t) / num_rows:.2f}", f"{median(t) / base:.3f}"]
        for name, t in times.items()
    ]
    print(table(["part", "median us a row", "min us a row", "/ (SAS + SDS)"], rows))
    print(load_average())


def main(argv=None):
    p = parser()
    p.add_argument("--sides", type=int, nargs="+", default=[16], help="Finer thumbnails' sides S.")
    p.add_argument("--compare", type=int, nargs="+", default=[8], help="Compared grid side C, per side.")
    p.add_argument("--scales", type=float, nargs="+", default=[0.85, 0.9, 0.95, 1.0])
    p.add_argument("--positions", type=int, default=3, help="Box places per axis and scale.")
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8], help="Candidates per row (0: all).")
    p.add_argument("--verify_m", type=int, nargs="+", default=[1, 2], help="m for the verification tables.")
    p.add_argument("--candidates", nargs="+", default=["thumbnail", "features", "both"], help="For the recall.")
    p.add_argument("--verify_candidates", nargs="+", default=["thumbnail"])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.92, 0.94, 0.95, 0.96, 0.97])
    p.add_argument("--agreements", type=float, nargs="+", default=[0.7])
    p.add_argument("--prefilter", type=float, default=0.6, help="8x8 thumbnail cosine a pair needs to be verified.")
    p.add_argument(
        "--cost_classes", type=int, default=10, help="Classes of ImageNet-1k's shape for the cost part (0: skip it)."
    )
    p.add_argument("--cost_fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    print(f"command: {command}", flush=True)
    started = time.perf_counter()
    run = prepare(args)
    copy_of, kinds, cross, labels, valid = (run[name] for name in ("copy_of", "kinds", "cross", "labels", "valid"))
    scores = run["scores"]
    num_rows = len(labels)
    copies = np.nonzero(copy_of >= 0)[0]
    truth_conflict = np.zeros(num_rows, dtype=bool)
    truth_conflict[copies[cross[copies]]] = True
    truth_conflict[copy_of[copies[cross[copies]]]] = True

    # The run's descriptors: centred features (as find_duplicates centres them), predicted classes, 8x8 thumbnails.
    features = F.normalize(run["features"][torch.arange(num_rows)].to(torch.float32), dim=-1)
    valid_t, labels_t = torch.from_numpy(valid), torch.from_numpy(labels)
    centred = F.normalize(features - features[valid_t].mean(dim=0), dim=-1)
    predicted = (features @ run["class_features"].to(torch.float32).T).argmax(dim=1)
    usable = valid_t.nonzero().squeeze(1)
    classes = group_rows_by_label(labels_t, usable)
    predicted_classes = group_rows_by_label(predicted, usable)
    descriptors = {"thumbnail": thumbnail_vectors(run["thumbnails"]), "features": centred}

    def candidate_pairs(name: str, m: int) -> Tensor:
        names = ["thumbnail", "features"] if name == "both" else [name]
        found = [top_pairs(descriptors[n], classes, m, None) for n in names]
        found += [top_pairs(descriptors[n], predicted_classes, m, labels_t) for n in names]
        return torch.unique(torch.cat(found), dim=0)

    def cells(found: np.ndarray) -> list[str]:
        return [
            f"{found[(kinds[copies] == kind) & (cross[copies] == across)].mean():.2f}"
            for kind in KINDS
            for across in (False, True)
        ]

    kind_header = [f"{k} {'across' if a else 'within'}" for k in KINDS for a in (False, True)]
    print(f"\npool: {args.pool_size} rows + {len(copies)} copies; model {run['model']}")
    print("\nCandidate recall (the copy's original among its m candidates, or the copy among the original's)")
    rows = []
    for name in args.candidates:
        for m in args.m:
            pairs = candidate_pairs(name, m).numpy()
            keys = set(map(tuple, pairs))
            truth = np.sort(np.stack([copies, copy_of[copies]], axis=1), axis=1)
            found = np.array([tuple(pair) in keys for pair in truth])
            rows.append([name, m, *cells(found), f"{len(pairs) / num_rows:.1f}"])
    print(table(["candidates", "m", *kind_header, "pairs per row"], rows), flush=True)

    images = Dataset.from_parquet(str(run["pool_file"]))["img"]
    thetas = boxes(args.scales, args.positions)
    prefer_kept = {ratio: scores[selected_column(ratio)].astype(bool) for ratio in RATIOS}
    print(f"\n{thetas.shape[0]} boxes: scales {args.scales}, {args.positions} places per axis")
    for side, compare in zip(args.sides, args.compare):
        clock = time.perf_counter()
        grids = grey_grids(images, side)
        measure_seconds = time.perf_counter() - clock
        matrix, whole_matrix = box_matrix(thetas, side, compare), box_matrix(boxes([1.0], 1), side, compare)
        print(
            f"\nthumbnail side {side} ({side * side} bytes a row; 13M rows: {13e6 * side * side / 2**30:.1f} GiB), "
            f"compared at {compare}x{compare}; measuring {1e6 * measure_seconds / num_rows:.0f} us a row; box views "
            f"{thetas.shape[0] * compare * compare * 4} bytes a row while its class is compared"
        )
        for name in args.verify_candidates:
            for m in args.verify_m:
                for agreement in args.agreements:
                    # Timed: the candidates, then for the pairs whose features agree (a pre-filter: only they need
                    # the search) the box views of their rows and the alignment scores.
                    clock = time.perf_counter()
                    pairs = candidate_pairs(name, m)
                    candidates_seconds = time.perf_counter() - clock
                    small = descriptors["thumbnail"]
                    pairs = pairs[(small[pairs[:, 0]] * small[pairs[:, 1]]).sum(dim=1) >= args.prefilter]
                    pairs = pairs[(centred[pairs[:, 0]] * centred[pairs[:, 1]]).sum(dim=1) >= agreement]
                    involved, position = torch.unique(pairs, return_inverse=True)
                    views = matrix_views(grids[involved], matrix, compare)
                    whole = matrix_views(grids[involved], whole_matrix, compare)[:, 0]
                    align = alignment_scores(views, whole, position.reshape(-1, 2))
                    seconds = time.perf_counter() - clock
                    verify_table, conflict_table = [], []
                    for threshold in args.thresholds:
                        chosen = pairs[align >= threshold].numpy()
                        group = groups_of_pairs(chosen, num_rows)
                        setting = f"{threshold:g} / {agreement:g}"
                        kind_row, found = kind_cells(group, copy_of, copies, kinds, cross)
                        verify_table.append([setting, *kind_row])
                        conflicts = conflict_rows(group, labels)
                        hit = (conflicts & truth_conflict).sum()
                        once = []
                        for ratio in RATIOS:
                            kept = prefer_kept[ratio]
                            at_most_once = found | (kept[copies].astype(int) + kept[copy_of[copies]] <= 1)
                            once.append(f"{at_most_once.mean():.3f}")
                        conflict_table.append(
                            [
                                setting,
                                f"{hit / max(conflicts.sum(), 1):.2f}",
                                f"{hit / truth_conflict.sum():.2f}",
                                *once,
                            ]
                        )
                    print(
                        f"\nS={side}, candidates {name}, m={m}, 8x8 >= {args.prefilter:g}, features >= {agreement:g}: "
                        f"{len(pairs)} pairs "
                        f"verified ({len(pairs) / num_rows:.2f} a row, {len(involved) / num_rows:.2f} of the rows); "
                        f"{1e6 * seconds / num_rows:.0f} us a row, of which candidates "
                        f"{1e6 * candidates_seconds / num_rows:.0f}"
                    )
                    header = ["alignment / features"] + [f"{k} R / P" for k in kind_header] + ["all pairs P"]
                    print(table(header, verify_table))
                    once_header = [f"kept once {r:g} (ESTIMATED)" for r in RATIOS]
                    print(table(["alignment / features", "conflict P", "conflict R", *once_header], conflict_table))
        if args.cost_classes:
            cost_at_imagenet_shape(args, thetas, side, compare)
    print(f"\nseconds: {time.perf_counter() - started:.0f}; command: {command}")


if __name__ == "__main__":
    main()
