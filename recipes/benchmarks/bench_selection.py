"""Selection speed: `exact` (the k largest rewards) against the released STE optimiser `sgd`, on synthetic scores.

Four parts, all through the library's public API (hf_clipsel.selection.select):

1. N = 50,000 (10 classes): per ratio, time of `exact` and `sgd` (interleaved, median of --repeats), sgd's
   iterations, |count - k|, the released objective of both masks, and the overlap of sgd's set with exact's; then
   all five ratios in one call each, as the pipeline runs them.
2. How sgd's iteration count grows with N (full runs at --growth-sizes), and a linear fit through the origin.
3. N = 1,281,167 (1000 classes): `exact` for all five ratios in one call (alpha = 0.1 as released, and alpha =
   ratio as in the paper's text). `sgd` is run with an iteration cap (--sgd-cap-large) to measure its time per
   iteration; its full time is EXTRAPOLATED as (fitted iterations at this N, capped at the released 100,000) x
   (time per iteration). --sgd-cap-large 0 runs it uncapped instead (about an hour per ratio on 2 cores).
4. Peak memory and time, in a fresh subprocess, of scores + selection for 1,281,167 synthetic 512-d embeddings:
   SAS against 1000 class features, SDS by per-class kNN (K = 50), min-max, exact selection at five ratios; then the
   duplicate score's search (hf_clipsel.duplicates.find_duplicates), timed apart and as a share of SAS + SDS.
5. What the duplicate score adds to scoring time: SAS + SDS against the duplicate search, interleaved, at ImageNet-1k's
   class shape (1,281 rows a class, 512-d) on --cost-classes classes (default 1000; the cost is linear in classes),
   without and with the crop search (duplicate_crops) verifying --crop-share of the rows; the rows' classes among
   --cost-text-classes class texts (default 1000: the search predicts each row's class among them).
scale (only when named: `--parts scale --rows N --dim D [--classes C]`): the library's out-of-core score stage and
   selection of five ratios on a synthetic embedding cache in its own format, ImageNet-21k-shaped (recipes/benchmarks/
   _scale.py says how); the last line printed is one JSON object (rows, dim, peak_rss_gib, seconds, ...).
   --store-dtype float16 writes the class-sorted feature store in float16 (ScoringConfig.feature_store_dtype).

Default runtime on a 2-core CPU: about 6 minutes. Scale up with e.g. --growth-sizes 50000 200000 800000.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import (
    crop_candidate_thumbnails,
    footer,
    header,
    imagenet_class_shape,
    interleaved,
    load_average,
    median,
    reset_peak,
    setup,
    status_gib,
    table,
    timed,
)
from _scale import big_class_child, part_scale
from _scale import child as scale_child

from hf_clipsel import scoring
from hf_clipsel.configs import SelectionConfig, budget
from hf_clipsel.duplicates import find_duplicates
from hf_clipsel.features import FeatureStore
from hf_clipsel.scores import SCORES, ScoreInputs, registered_scores
from hf_clipsel.scores.duplicate import CROP_THUMBNAIL, THUMBNAIL
from hf_clipsel.scores_table import score_values
from hf_clipsel.scoring_config import FEATURE_STORE_DTYPES
from hf_clipsel.selection import SelectionInputs, SgdOptions, select
from hf_clipsel.selection.sgd import run_released_sgd

RATIOS = [0.1, 0.3, 0.5, 0.7, 0.9]
IMAGENET_ROWS = 1_281_167
RELEASED_CAP = 100_000


def synthetic_inputs(num_rows: int, num_classes: int, seed: int = 0) -> SelectionInputs:
    """Scores shaped like real ones: alignment skewed high (most labels are right), diversity skewed low (a few
    outliers per class), min-max normalised to [0, 1] as the pipeline does."""
    rng = np.random.default_rng(seed)
    alignment = torch.from_numpy(rng.beta(5.0, 2.0, num_rows))
    diversity = torch.from_numpy(rng.beta(2.0, 5.0, num_rows))
    return SelectionInputs(
        row_id=np.arange(num_rows),
        labels=rng.integers(0, num_classes, num_rows),
        semantic_alignment_normalized=scoring.min_max(alignment).numpy(),
        sample_diversity_normalized=scoring.min_max(diversity).numpy(),
    )


def released_objective(inputs: SelectionInputs, mask: np.ndarray, k: int, alpha: float, beta: float = 2.0) -> float:
    """The released loss at a hard mask x: -mean(x a) - alpha mean(x d) + beta |sum x - k| / N (lower is better)."""
    a = inputs.semantic_alignment_normalized.astype(np.float64)
    d = inputs.sample_diversity_normalized.astype(np.float64)
    x = mask.astype(np.float64)
    n = inputs.num_rows
    return float(-(x * a / a.mean()).mean() - alpha * (x * d / d.mean()).mean() + beta * abs(x.sum() - k) / n)


def config(ratios, method, alpha=0.1, cap=RELEASED_CAP) -> SelectionConfig:
    options = SgdOptions(sgd_max_iterations=cap) if method == "sgd" else None
    return SelectionConfig(selection_ratios=list(ratios), selection_method=method, alpha=alpha, options=options)


def part_small(num_rows: int, repeats: int) -> None:
    inputs = synthetic_inputs(num_rows, 10)
    print(f"\n## 1. exact vs sgd at N = {num_rows:,} (10 classes, alpha = 0.1), median of {repeats} interleaved runs")
    print(load_average())
    rows = []
    for ratio in RATIOS:
        results = {}

        def run(method, ratio=ratio, results=results):
            results[method] = select(inputs, config([ratio], method))

        times = interleaved({"exact": lambda: run("exact"), "sgd": lambda: run("sgd")}, repeats)
        k = budget(ratio, num_rows)
        exact_mask, sgd_mask = results["exact"][ratio], results["sgd"][ratio]
        diagnostics = results["sgd"].diagnostics[ratio]
        rows.append(
            {
                "ratio": ratio,
                "k": k,
                "exact s": median(times["exact"]),
                "sgd s": median(times["sgd"]),
                "sgd / exact": median(times["sgd"]) / median(times["exact"]),
                "sgd iterations": diagnostics["iterations"],
                "sgd abs(count-k)": diagnostics["count_error"],
                "objective exact": released_objective(inputs, exact_mask, k, 0.1),
                "objective sgd": released_objective(inputs, sgd_mask, k, 0.1),
                "overlap": float((exact_mask & sgd_mask).sum() / k),
            }
        )
    table(rows)
    print(
        "overlap = |sgd set & exact set| / k; objective = the released loss at the final hard mask (lower is better)"
    )
    # As the pipeline runs them: every ratio in one call (exact computes one reward for all of them).
    times = interleaved(
        {
            "exact": lambda: select(inputs, config(RATIOS, "exact")),
            "sgd": lambda: select(inputs, config(RATIOS, "sgd")),
        },
        repeats,
    )
    exact_s, sgd_s = median(times["exact"]), median(times["sgd"])
    table([{"five ratios in one call": "", "exact s": exact_s, "sgd s": sgd_s, "sgd / exact": sgd_s / exact_s}])
    print(load_average())


def part_growth(sizes: list[int]) -> dict[float, float]:
    """Full sgd runs at several N; returns iterations per row (fit through the origin) for each ratio."""
    print(f"\n## 2. sgd iterations to converge against N (released cap {RELEASED_CAP:,}; linear fit through 0)")
    print(load_average())
    iterations = {ratio: [] for ratio in RATIOS}
    rows = []
    for num_rows in sizes:
        inputs = synthetic_inputs(num_rows, 10)
        seconds, result = timed(select, inputs, config(RATIOS, "sgd"))
        row = {"N": num_rows, "sgd s (5 ratios)": seconds}
        for ratio in RATIOS:
            iterations[ratio].append(result.diagnostics[ratio]["iterations"])
            row[f"iters @{ratio}"] = iterations[ratio][-1]
        rows.append(row)
    n = np.asarray(sizes, dtype=np.float64)
    slopes = {ratio: float(n @ np.asarray(its) / (n @ n)) for ratio, its in iterations.items()}
    rows.append({"N": "fit: iterations per 1,000 rows", **{f"iters @{r}": 1000 * s for r, s in slopes.items()}})
    table(rows)
    print(load_average())
    return slopes


def part_large(repeats: int, sgd_cap: int, sgd_ratios: list[float], slopes: dict[float, float]) -> None:
    inputs = synthetic_inputs(IMAGENET_ROWS, 1000)
    print(f"\n## 3. N = {IMAGENET_ROWS:,} (1000 classes)")
    print(load_average())
    variants = {
        "exact, alpha=0.1 (released), 5 ratios": lambda: select(inputs, config(RATIOS, "exact", 0.1)),
        "exact, alpha=ratio (paper text), 5 ratios": lambda: select(inputs, config(RATIOS, "exact", None)),
    }
    times = interleaved(variants, repeats)
    table([{"variant": name, "median s": median(t), "min s": min(t), "max s": max(t)} for name, t in times.items()])
    print(f"(median of {repeats} interleaved runs; target: all five ratios in < 5 s)")
    print(load_average())

    rows = []
    a = scoring.scale_by_mean(torch.from_numpy(inputs.semantic_alignment_normalized))
    d = scoring.scale_by_mean(torch.from_numpy(inputs.sample_diversity_normalized))
    for ratio in sgd_ratios:
        k = budget(ratio, IMAGENET_ROWS)
        cap = sgd_cap or RELEASED_CAP
        seconds, (mask, diagnostics) = timed(run_released_sgd, a, d, k, IMAGENET_ROWS, 0.1, 2.0, 1e-3, cap)
        per_iteration = seconds / max(diagnostics["iterations"], 1)
        row = {"ratio": ratio, "sgd s/iteration": per_iteration, "iterations run": diagnostics["iterations"]}
        if not sgd_cap:  # uncapped: everything measured
            exact_mask = select(inputs, config([ratio], "exact"))[ratio]
            row.update(
                {
                    "converged": diagnostics["converged"],
                    "sgd s": seconds,
                    "abs(count-k)": int(abs(mask.sum() - k)),
                    "objective exact": released_objective(inputs, exact_mask, k, 0.1),
                    "objective sgd": released_objective(inputs, mask, k, 0.1),
                    "overlap": float((mask & exact_mask).sum() / k),
                }
            )
        else:
            projected = slopes[ratio] * IMAGENET_ROWS
            row["EXTRAPOLATED iterations"] = f"{projected:,.0f}" + (" > cap" if projected > RELEASED_CAP else "")
            row["projected"] = min(projected, RELEASED_CAP)
        rows.append(row)
    if sgd_cap:
        # One step costs the same at every ratio (same tensors, same operations): the median over the ratios is the
        # least load-sensitive estimate of it.
        step = median([row["sgd s/iteration"] for row in rows])
        for row in rows:
            row["EXTRAPOLATED sgd s"] = row.pop("projected") * step
        print(f"median s/iteration over the ratios: {step:.4g}")
    table(rows)
    if not sgd_cap:
        print("sgd ran uncapped (released cap 100,000): every figure above is measured.")
    else:
        print(
            f"sgd capped at {sgd_cap} iterations to measure its time per iteration. EXTRAPOLATED iterations = fitted "
            "iterations per row (part 2) x N; EXTRAPOLATED time = min(that, 100,000 cap) x median s/iteration."
        )
    print(load_average())


def part_duplicate_cost(
    num_classes: int, repeats: int, crop_share: float = 0.6, text_classes: int = 1000, knn_k: int = 50, dim: int = 512
) -> None:
    """What the duplicate score adds to scoring at ImageNet-1k's class shape (1,281 rows a class, 512-d): SAS + SDS
    against hf_clipsel.duplicates.find_duplicates on ``num_classes`` classes (all three cost linearly in the classes:
    1000 is ImageNet-1k itself), without and with the crop search (``duplicate_crops``; thumbnails where a
    ``crop_share`` of each class's rows are crop candidates whose features agree, as the benchmark's pool had)."""
    rows_per_class = IMAGENET_ROWS // 1000
    generator = torch.Generator().manual_seed(0)
    labels, features, text, valid, thumbnails = imagenet_class_shape(num_classes, rows_per_class, generator, dim)
    look_alikes, crop_thumbnails = crop_candidate_thumbnails(labels, crop_share, generator)
    # ImageNet-1k's 1000 class texts whatever the classes of rows: the search predicts each row's class among them
    # (N x 1000 x d; with --cost-classes 50 texts alone, that term was 20 times too small)
    others = torch.randn(max(0, text_classes - num_classes), dim, generator=generator)
    text = torch.cat([text, torch.nn.functional.normalize(others, dim=-1)])
    # the classes the model prefers: the score stage computes them once for the table and hands them to the search
    predicted = (torch.nn.functional.normalize(features, dim=-1) @ text.T).argmax(dim=-1)
    print(
        f"\n## 5. Duplicate score cost: {num_classes} classes x {rows_per_class} rows, {dim}-d, {len(text)} class "
        "texts (ImageNet-1k shape)"
    )
    print(load_average())
    variants = {
        "SAS + SDS (K = 50)": lambda: (
            scoring.semantic_alignment(features, text, labels),
            scoring.sample_diversity(features, labels, knn_k),
        ),
        "class posterior (scoring's work over every class text)": lambda: scoring.class_posterior(
            features, text, labels, 100.0, 0.0, "softmax"
        ),
        "predicted classes (the table's predicted_label)": lambda: (
            torch.nn.functional.normalize(features, dim=-1) @ text.T
        ).argmax(dim=-1),
        "duplicate search": lambda: find_duplicates(
            features, text, labels, valid, thumbnails=thumbnails, predicted_classes=predicted
        ),
        "duplicate search predicting the classes itself": lambda: find_duplicates(
            features, text, labels, valid, thumbnails=thumbnails
        ),
        "features alone (scores without thumbnails)": lambda: find_duplicates(
            features, text, labels, valid, predicted_classes=predicted
        ),
        f"duplicate search with crops ({crop_share:g} of the rows verified)": lambda: find_duplicates(
            features,
            text,
            labels,
            valid,
            thumbnails=look_alikes,
            crop_thumbnails=crop_thumbnails,
            predicted_classes=predicted,
        ),
    }
    # The library's score stage itself (scores_table.score_values: every registered score over a feature store, as
    # a run scores), and the duplicate score's part of it: what the duplicate score adds to scoring time.
    stage = {
        crops: stage_inputs(features, text, labels, look_alikes, crop_thumbnails, crops) for crops in (False, True)
    }
    stage_predicted = {crops: dataclasses.replace(inputs, predicted=predicted) for crops, inputs in stage.items()}
    for crops, label in ((False, "without crops"), (True, "with crops")):
        variants[f"score stage ({label})"] = lambda crops=crops: score_values(stage[crops])
        variants[f"the duplicate score in it ({label})"] = lambda crops=crops: SCORES["duplicate"].compute(
            stage_predicted[crops]
        )
    times = interleaved(variants, repeats)
    table([{"part": name, "median s": median(t), "min s": min(t), "max s": max(t)} for name, t in times.items()])
    for label in ("without crops", "with crops"):
        duplicate = median(times[f"the duplicate score in it ({label})"])
        rest = median(times[f"score stage ({label})"]) - duplicate
        print(
            f"the duplicate score adds {duplicate / rest:.3f} to the rest of the score stage, {label} (target <= 0.20)"
        )
    share = median(times["duplicate search"]) / median(times["SAS + SDS (K = 50)"])
    print(f"duplicate search / (SAS + SDS) = {share:.3f} (median of {repeats} interleaved runs; target <= 0.20)")
    crops = median(times[f"duplicate search with crops ({crop_share:g} of the rows verified)"])
    print(f"with crops / (SAS + SDS) = {crops / median(times['SAS + SDS (K = 50)']):.3f}")
    scoring_time = sum(
        median(times[name])
        for name in (
            "SAS + SDS (K = 50)",
            "class posterior (scoring's work over every class text)",
            "predicted classes (the table's predicted_label)",
        )
    )
    without = median(times["duplicate search"])
    print(
        f"against SAS + SDS + class posterior + predicted classes: {without / scoring_time:.3f} without crops, "
        f"{crops / scoring_time:.3f} with"
    )
    print(load_average())


def stage_inputs(features, text, labels, thumbnails, crop_thumbnails, duplicate_crops: bool) -> ScoreInputs:
    """The score stage's inputs for synthetic rows, as scores_table.score_stage builds them: the features in a
    :class:`~hf_clipsel.features.FeatureStore`, the duplicate score's thumbnails in the statistics (the damage
    statistics as zeros: that score copies them)."""
    statistics = {
        column.name: np.zeros(len(labels), dtype=np.float32)
        for score in registered_scores()
        if score.measures_pixels and score.measured is None
        for column in score.columns
    }
    statistics[THUMBNAIL], statistics[CROP_THUMBNAIL] = thumbnails.numpy(), crop_thumbnails.numpy()
    return ScoreInputs(
        features=FeatureStore.from_tensor(features, labels.numpy()),
        class_features=text,
        labels=labels,
        valid=torch.ones(len(labels), dtype=torch.bool),
        logit_scale=100.0,
        knn_k=50,
        duplicate_crops=duplicate_crops,
        statistics=statistics,
    )


def memory_child(num_classes: int, knn_k: int, dim: int, seed: int = 0) -> None:
    """Scores + selection for IMAGENET_ROWS synthetic embeddings; prints one JSON line (run in a fresh process)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (IMAGENET_ROWS,), generator=generator)
    centres = torch.randn(num_classes, dim, generator=generator)
    # Class centre plus noise, built in place in float32 (no float64 temporaries): 2.6 GB of features.
    features = torch.randn(IMAGENET_ROWS, dim, generator=generator).mul_(0.5)
    for start in range(0, IMAGENET_ROWS, 65_536):
        features[start : start + 65_536] += centres[labels[start : start + 65_536]]
    # Text features near the class centres, as a real CLIP's are: most rows are predicted in their own class, which
    # sets the duplicate score's cross-class groups.
    text = centres + 0.5 * torch.randn(num_classes, dim, generator=generator)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    resident_before = status_gib("VmRSS")
    reset_peak()  # so that VmHWM below is the peak of scoring + selection alone
    start = time.perf_counter()
    sas = scoring.semantic_alignment(features, text, labels)
    after_sas = time.perf_counter()
    sds = scoring.sample_diversity(features, labels, knn_k)
    after_sds = time.perf_counter()
    inputs = SelectionInputs(
        row_id=np.arange(IMAGENET_ROWS),
        labels=labels.numpy(),
        semantic_alignment_normalized=scoring.min_max(sas).numpy(),
        sample_diversity_normalized=scoring.min_max(sds).numpy(),
    )
    masks = select(inputs, config(RATIOS, "exact"))
    end = time.perf_counter()
    find_duplicates(features, torch.nn.functional.normalize(text, dim=-1), labels, torch.ones_like(labels, dtype=bool))
    after_duplicates = time.perf_counter()
    assert all(int(masks[r].sum()) == budget(r, IMAGENET_ROWS) for r in RATIOS)
    print(
        json.dumps(
            {
                "embeddings GiB": features.numel() * 4 / 1024**3,
                "RSS before scoring GiB": resident_before,
                "peak RSS during scoring+selection GiB": status_gib("VmHWM"),
                "peak RSS while building the embeddings GiB": peak_before,
                "SAS s": after_sas - start,
                "SDS s": after_sds - after_sas,
                "normalise + select s": end - after_sds,
                "total s": end - start,
                "duplicate score s": after_duplicates - end,
                "duplicate / (SAS + SDS)": (after_duplicates - end) / (after_sds - start),
            }
        )
    )


def part_memory(threads: int | None) -> None:
    print(f"\n## 4. Peak memory: scores + selection for {IMAGENET_ROWS:,} x 512 synthetic embeddings, fresh process")
    print(load_average())
    command = [sys.executable, __file__, "--memory-child"] + (["--threads", str(threads)] if threads else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    table([figures])
    print(
        "RSS = the child's whole resident memory (python, torch, the embeddings included); the peak is the kernel's"
        " high-water mark (VmHWM), reset after the embeddings were built. Target: <= 4 GB (3.73 GiB)."
    )
    print(load_average())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-rows", type=int, default=50_000, help="N of part 1")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per timing (median reported)")
    parser.add_argument("--growth-sizes", type=int, nargs="+", default=[12_500, 25_000, 50_000, 100_000])
    parser.add_argument("--sgd-cap-large", type=int, default=200, help="sgd iteration cap at 1.28M; 0 = uncapped")
    parser.add_argument("--sgd-ratios-large", type=float, nargs="+", default=RATIOS, help="ratios sgd runs at 1.28M")
    parser.add_argument(
        "--parts", nargs="+", default=["1", "2", "3", "4", "5"], choices=["1", "2", "3", "4", "5", "scale"]
    )
    parser.add_argument("--cost-classes", type=int, default=1000, help="part 5: classes (1000: ImageNet-1k)")
    parser.add_argument(
        "--crop-share", type=float, default=0.6, help="part 5: share of the rows the crop search verifies"
    )
    parser.add_argument("--cost-text-classes", type=int, default=1000, help="part 5: class texts (ImageNet-1k: 1000)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="scale: rows of the synthetic cache")
    parser.add_argument("--dim", type=int, default=768, help="scale: width of the cached vectors and the features")
    parser.add_argument(
        "--classes", type=int, default=None, help="scale: classes (default: 21,000 x rows / 13M, ImageNet-21k's shape)"
    )
    parser.add_argument("--largest", type=int, default=3000, help="scale: rows of the largest class")
    parser.add_argument("--text-classes", type=int, default=100, help="scale: classes of the class-text terms")
    parser.add_argument("--knn-k", type=int, default=50, help="scale: neighbours of the diversity score")
    parser.add_argument(
        "--probe-rows", type=int, default=20_000, help="scale: rows timing 21,000 text classes; 0: off"
    )
    parser.add_argument("--work-dir", default="bench_scale_work", help="scale: where the synthetic cache goes")
    parser.add_argument("--keep", action="store_true", help="scale: keep the synthetic cache afterwards")
    parser.add_argument("--big-class", type=int, default=0, help="scale: also time one class of this many rows")
    parser.add_argument("--knn-block-rows", type=int, default=8192, help="scale: the big class's kNN block rows")
    parser.add_argument(
        "--store-dtype", default="float32", choices=FEATURE_STORE_DTYPES,
        help="scale: the class-sorted feature store's number type (the library's feature_store_dtype)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scale-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args.threads)
    if args.memory_child:
        memory_child(num_classes=1000, knn_k=50, dim=512)
        return
    if args.scale_child and args.big_class:
        big_class_child(Path(args.scale_child), args.big_class, args.dim, args.knn_k, args.knn_block_rows)
        return
    if args.scale_child:
        scale_child(Path(args.scale_child), args.text_classes, args.knn_k, args.store_dtype)
        return
    started = time.perf_counter()
    header("bench_selection: exact vs released sgd")
    if "1" in args.parts:
        part_small(args.small_rows, args.repeats)
    needs_fit = "2" in args.parts or ("3" in args.parts and args.sgd_cap_large)
    slopes = part_growth(args.growth_sizes) if needs_fit else {}
    if "3" in args.parts:
        part_large(args.repeats, args.sgd_cap_large, args.sgd_ratios_large, slopes)
    if "4" in args.parts:
        part_memory(args.threads)
    if "5" in args.parts:
        part_duplicate_cost(args.cost_classes, args.repeats, args.crop_share, args.cost_text_classes)
    result = part_scale(__file__, args) if "scale" in args.parts else None
    footer(started)
    if result is not None:  # the last line: one JSON object
        print(json.dumps(result))


if __name__ == "__main__":
    main()
