"""Near-duplicates and conflicting labels: does the ``duplicate`` score find injected copies, and does a selection keep
one copy?

A pool of CIFAR-10 training rows (seeded) gets injected copies of some of its rows, appended at its end: within the
original's class, and across classes (the copy carries another, random, label); of five kinds: exact, JPEG
re-encoded (quality 60-90), resized (0.7-1.3x), cropped (85-95% of each side, random place), colour-shifted (each
channel scaled by 0.9-1.1). Each original is copied once. One `hf_clipsel` run (the default selection, the given
CLIP or the proxy of proxy_clip.py) embeds, adapts, scores and selects it at ratios 0.3..0.9. Printed:

- per kind, threshold, feature agreement and crop alignment (groups found again by hf_clipsel.duplicates: the cosine
  of the rows' zero-mean 8x8 grey thumbnails at or above the threshold, and the centred cosine of that run's image
  features at or above the agreement; with an alignment threshold, not 'off', the crop search of duplicate_crops
  too; and, as the fallback for scores without thumbnails, the features alone): recall (the copy
  joins its original's group) and precision (of the pairs a copy's group makes with it, the share that are its
  original); overall pair precision (every pair of every group, including groups of two rows of the base pool:
  CIFAR-10's own near-duplicates or false finds);
- conflicting labels: precision and recall of the rows in groups of several labels against the cross-class copies
  and their originals, and how often the copy the model prefers carries the true label (what keeping it would keep);
- per ratio: the share of injected groups the default selection keeps at most once (the run's scores search crops
  too, with --duplicate_crops);
- the share of rows that are crop candidates, and the search's time per row with and without crops.

    python recipes/benchmarks/bench_duplicates.py --data_dir /path/to/cifar10 --threads 1
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import DATA_DIR_HELP, load_cifar10
from PIL import Image
from proxy_clip import ProxySpec, decode_uint8, train_proxy

from hf_clipsel.configs import ClipselConfig, ScoringConfig
from hf_clipsel.context import prompts_of
from hf_clipsel.core.names import selected_column
from hf_clipsel.duplicates import (
    CROP_CANDIDATE,
    CROP_SIMILARITY,
    FEATURE_AGREEMENT,
    THUMBNAIL_SIMILARITY,
    find_duplicates,
)
from hf_clipsel.embedding import embed_class_prompts
from hf_clipsel.modeling import class_text_features
from hf_clipsel.runs.stages import drive
from hf_clipsel.scores.duplicate import CROP_THUMBNAIL, GROUP_COLUMN, KEEP_PREFERRED_LABEL, THUMBNAIL, preference
from hf_clipsel.scores_table import score_stage

KINDS = ("exact", "jpeg", "resize", "crop", "colour")
RATIOS = (0.3, 0.5, 0.7, 0.9)


def copy_image(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A copy of ``image`` (RGB) of ``kind``."""
    if kind == "exact":
        return image.copy()
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(60, 91)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    width, height = image.size
    if kind == "resize":
        factor = rng.uniform(0.7, 1.3)
        return image.resize((round(width * factor), round(height * factor)), Image.BICUBIC)
    if kind == "crop":
        side = rng.uniform(0.85, 0.95)
        w, h = round(width * side), round(height * side)
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        return image.crop((left, top, left + w, top + h))
    gains = rng.uniform(0.9, 1.1, size=3)  # colour: each channel scaled
    pixels = np.asarray(image, dtype=np.float32) * gains
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def build_pool(train, args, path: Path) -> None:
    """The pool (columns img, label, copy_of, copy_kind, cross_class) as one parquet file at ``path``."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(args.seed)
    base = np.sort(rng.choice(len(train), args.pool_size, replace=False))
    rows = train.select(base.tolist())
    images, labels = [image.convert("RGB") for image in rows["img"]], list(rows["label"])
    copy_of, kinds, cross = [-1] * len(images), [""] * len(images), [False] * len(images)
    plan = [(kind, False) for kind in KINDS for _ in range(args.copies)]
    plan += [(kind, True) for kind in KINDS for _ in range(args.cross_copies)]
    originals = rng.choice(len(base), len(plan), replace=False)
    for (kind, across), original in zip(plan, originals):
        images.append(copy_image(images[original], kind, rng))
        label = labels[original]
        labels.append(int((label + rng.integers(1, 10)) % 10) if across else label)
        copy_of.append(int(original))
        kinds.append(kind)
        cross.append(across)
    features = Features(
        {
            "img": ImageFeature(),
            "label": train.features["label"],
            "copy_of": Value("int64"),
            "copy_kind": Value("string"),
            "cross_class": Value("bool"),
        }
    )
    pool = Dataset.from_dict(
        {"img": images, "label": labels, "copy_of": copy_of, "copy_kind": kinds, "cross_class": cross},
        features=features,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pool.to_parquet(str(path))


def ensure_model(args, test) -> str:
    if args.model_name_or_path:
        return args.model_name_or_path
    path = Path(args.work_dir) / f"proxy-rows8000-epochs{args.proxy_epochs}"
    if not (path / "model.safetensors").exists():
        path.parent.mkdir(parents=True, exist_ok=True)  # the training state is saved beside the model
        rows = test.select(range(8000))
        spec = ProxySpec(epochs=args.proxy_epochs)
        names = test.features["label"].names
        train_proxy(path, decode_uint8(rows), torch.tensor(rows["label"]), names, spec, str(path) + ".state.pt")
    return str(path)


def pair_scores(group: np.ndarray, copy_of: np.ndarray, copies: np.ndarray) -> tuple[np.ndarray, int, int]:
    """For each copy in ``copies``: whether it shares its original's group; and the number of (copy, other row)
    pairs its groups make, and of all pairs of all groups."""
    found = (group[copies] >= 0) & (group[copies] == group[copy_of[copies]])
    sizes = np.bincount(group[group >= 0]) if (group >= 0).any() else np.zeros(1, dtype=np.int64)
    copy_pairs = int(np.where(group[copies] >= 0, sizes[np.maximum(group[copies], 0)] - 1, 0).sum())
    return found, copy_pairs, int((sizes * (sizes - 1) // 2).sum())


def kind_cells(
    group: np.ndarray, copy_of: np.ndarray, copies: np.ndarray, kinds: np.ndarray, cross: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """One table row's cells for the groups ``group``: recall / pair precision of each kind of copy, within its class
    then across, and the precision of all pairs; and, for each copy, whether it joined its original's group."""
    found, _, all_pairs = pair_scores(group, copy_of, copies)
    cells = []
    for kind in KINDS:
        for across in (False, True):
            chosen = copies[(kinds[copies] == kind) & (cross[copies] == across)]
            kind_found, kind_pairs, _ = pair_scores(group, copy_of, chosen)
            precision = kind_found.sum() / kind_pairs if kind_pairs else float("nan")
            cells.append(f"{kind_found.mean():.2f} / {precision:.2f}")
    cells.append(f"{found.sum() / max(all_pairs, 1):.2f} ({all_pairs} pairs)")
    return cells, found


def conflict_rows(group: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool ``[N]``: rows in a group of several labels."""
    result = np.zeros(len(group), dtype=bool)
    for key in np.unique(group[group >= 0]):
        members = group == key
        result[members] = len(np.unique(labels[members])) > 1
    return result


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def parser() -> argparse.ArgumentParser:
    """The pool's and the run's flags (explore_duplicate_crops.py reads the same pool and run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--work_dir", default="/tmp/duplicates/work")
    p.add_argument("--model_name_or_path", default=None, help="A CLIP checkpoint; default: train the proxy.")
    p.add_argument("--proxy_epochs", type=int, default=ProxySpec.epochs)
    p.add_argument("--pool_size", type=int, default=3000, help="Base rows drawn from the training split.")
    p.add_argument("--copies", type=int, default=30, help="Within-class copies per kind.")
    p.add_argument("--cross_copies", type=int, default=10, help="Cross-class copies per kind.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    crops = p.add_mutually_exclusive_group()
    crops.add_argument(
        "--duplicate_crops",
        action="store_true",
        default=ScoringConfig().duplicate_crops,
        help="The run searches cropped copies too (scoring's duplicate_crops; the package's default: off).",
    )
    crops.add_argument("--no_duplicate_crops", dest="duplicate_crops", action="store_false", help="It does not.")
    return p


def prepare(args) -> dict:
    """The pool (built once under ``work_dir``) and one default run on it (cached there: a second call reads the
    run's embeddings): its scores, the copies' record, the run's image features, class features and thumbnails."""
    cifar = load_cifar10(args.data_dir)
    model = ensure_model(args, cifar["test"])
    key = f"pool{args.pool_size}-copies{args.copies}-cross{args.cross_copies}-seed{args.seed}"
    pool_file = Path(args.work_dir) / key / "pool" / "train-00000-of-00001.parquet"
    if not pool_file.exists():
        build_pool(cifar["train"], args, pool_file)
    config = ClipselConfig.from_flat(
        {
            "dataset_name": str(pool_file),
            "image_column": "img",
            "label_column": "label",
            "model_name_or_path": model,
            "selection_ratios": list(RATIOS),
            "duplicate_check": True,
            "duplicate_crops": args.duplicate_crops,
            "output_dir": str(Path(args.work_dir) / key / Path(model).name / "run"),
            "overwrite_output_dir": True,
        }
    )
    state, _ = drive(config, "run")
    scores = state.scores.with_format("numpy")[:]
    record = state.context.source.dataset.select_columns(["copy_of", "copy_kind", "cross_class"])[:]
    with torch.no_grad():
        text = embed_class_prompts(state.model, state.context.processor.tokenizer, prompts_of(state.context))
        class_features = class_text_features(state.model, text).cpu()
    _, features = score_stage(state.context, state.model, state.scoring)  # the run's store went with its selection
    return {
        "model": model,
        "pool_file": pool_file,
        "config": config,
        "scores": scores,
        "copy_of": np.asarray(record["copy_of"]),
        "kinds": np.asarray(record["copy_kind"]),
        "cross": np.asarray(record["cross_class"]),
        "labels": scores["label"].astype(np.int64),
        "valid": scores["flag_reason"] == "",
        "class_features": class_features,
        "features": features,
        "thumbnails": torch.from_numpy(np.asarray(state.scoring[THUMBNAIL][:], dtype=np.uint8)),
        "crop_thumbnails": torch.from_numpy(np.asarray(state.scoring[CROP_THUMBNAIL][:], dtype=np.uint8)),
    }


def main(argv=None):
    p = parser()
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.96, 0.97, 0.98, 0.99])
    p.add_argument("--agreements", type=float, nargs="+", default=[-1.0, 0.7, 0.8, 0.9])
    p.add_argument("--feature_thresholds", type=float, nargs="+", default=[0.99, 0.995])
    p.add_argument(
        "--crop_similarities",
        type=lambda value: None if value == "off" else float(value),
        nargs="+",
        default=[None, CROP_SIMILARITY],
        help="Alignment scores of the crop search, per thumbnail setting ('off': no crop search).",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    print(f"command: {command}", flush=True)
    started = time.perf_counter()
    run = prepare(args)
    model, config, scores, features, class_features, thumbnails, crop_thumbnails = (
        run[name]
        for name in ("model", "config", "scores", "features", "class_features", "thumbnails", "crop_thumbnails")
    )
    copy_of, kinds, cross, labels, valid = (run[name] for name in ("copy_of", "kinds", "cross", "labels", "valid"))
    labels_t, valid_t = torch.from_numpy(labels), torch.from_numpy(valid)
    copies = np.nonzero(copy_of >= 0)[0]
    truth_conflict = np.zeros(len(labels), dtype=bool)
    truth_conflict[copies[cross[copies]]] = True
    truth_conflict[copy_of[copies[cross[copies]]]] = True

    print(f"\npool: {args.pool_size} CIFAR-10 training rows + {len(copies)} copies; model {model}")
    rows, conflict_table = [], []
    settings = [(t, a, c) for a in args.agreements for t in args.thresholds for c in args.crop_similarities]
    settings += [(t, None, None) for t in args.feature_thresholds]
    seconds = {}
    for threshold, agreement, crop in settings:
        clock = time.perf_counter()
        if agreement is None:  # the fallback: features alone
            found = find_duplicates(features, class_features, labels_t, valid_t, threshold)
            name = f"features {threshold:g}"
        else:
            found = find_duplicates(
                features,
                class_features,
                labels_t,
                valid_t,
                threshold,
                None,
                thumbnails,
                agreement,
                None if crop is None else crop_thumbnails,
                CROP_SIMILARITY if crop is None else crop,
            )
            name = f"{threshold:g} / {agreement:g} / {'off' if crop is None else f'{crop:g}'}"
            seconds.setdefault(crop is not None, []).append(time.perf_counter() - clock)
            if crop is not None and len(seconds[True]) == 1:  # the rows whose nearest row is a crop candidate
                nearest = np.maximum(found["same_class"], found["other_class"])
                share = ((nearest >= CROP_CANDIDATE) & (nearest < threshold)).mean()
        group = found["group"]
        cells, found = kind_cells(group, copy_of, copies, kinds, cross)
        rows.append([name, *cells])
        conflicts = conflict_rows(group, labels)
        hit = (conflicts & truth_conflict).sum()
        groups_found = np.unique(group[copies[cross[copies]]][found[cross[copies]]])
        prefer = preference(scores, config.selection)
        prefers_true = [_preferred_is_true(group, gid, labels, copy_of, prefer) for gid in groups_found]
        conflict_table.append(
            [
                name,
                f"{hit / max(conflicts.sum(), 1):.2f}",
                f"{hit / truth_conflict.sum():.2f}",
                f"{np.mean(prefers_true) if prefers_true else float('nan'):.2f} ({len(prefers_true)} groups)",
            ]
        )
    header = ["thumbnail / features / crops"] + [
        f"{k} {'across' if a else 'within'} R / P" for k in KINDS for a in (False, True)
    ]
    print("\nRecall / precision per kind of copy (R: copy joins its original's group; P: of its group's pairs)")
    print(table(header + ["all pairs P"], rows))
    print("\nConflicting labels (rows in groups of several labels)")
    print(
        table(["thumbnail / features / crops", "precision", "recall", "model prefers the true label"], conflict_table)
    )
    if True in seconds:
        off, on = (1e6 * np.median(seconds[crops]) / len(labels) for crops in (False, True))
        print(
            f"\nrows whose nearest row is a crop candidate (thumbnail cosine in [{CROP_CANDIDATE}, "
            f"{args.thresholds[0]:g}), before the features' check): at most {share:.2f}; search us a row (median "
            f"over settings): crops off {off:.1f}, on {on:.1f}"
        )

    group = scores[GROUP_COLUMN].astype(np.int64)
    selection_rows = []
    originals = copy_of[copies]
    for ratio in RATIOS:
        kept = scores[selected_column(ratio)].astype(bool)
        at_most_once = kept[copies].astype(int) + kept[originals].astype(int) <= 1
        selection_rows.append(
            [
                f"{ratio:g}",
                f"{at_most_once[~cross[copies]].mean():.3f}",
                f"{at_most_once[cross[copies]].mean():.3f}",
                f"{at_most_once.mean():.3f}",
                f"{kept.sum()} of {len(kept)}",
            ]
        )
    print("\nInjected groups kept at most once by the default selection (thumbnail cosine ", end="")
    print(f">= {THUMBNAIL_SIMILARITY}, features >= {FEATURE_AGREEMENT}; ", end="")
    print(f"crops: {f'alignment >= {CROP_SIMILARITY}' if args.duplicate_crops else 'not searched'}; ", end="")
    print(f"conflicting labels: {'keep the preferred label' if KEEP_PREFERRED_LABEL else 'keep none'})")
    print(table(["ratio", "within class", "across classes", "all", "kept rows"], selection_rows))
    base_groups = np.unique(group[: args.pool_size][group[: args.pool_size] >= 0])
    base_only = [g for g in base_groups if not (np.nonzero(group == g)[0] >= args.pool_size).any()]
    print(f"\ngroups at the default threshold within the base pool alone: {len(base_only)}: {base_only[:10]}")
    print(f"seconds: {time.perf_counter() - started:.0f}; command: {command}")


def _preferred_is_true(group, key, labels, copy_of, preference_values) -> bool:
    """Whether the group's preferred row (highest preference) carries the label of the original image."""
    members = np.nonzero(group == key)[0]
    original = next((m for m in members if copy_of[m] < 0), members[0])
    preferred = members[np.argmax(preference_values[members])]
    return bool(labels[preferred] == labels[original])


if __name__ == "__main__":
    main()
