"""JPEG draft decoding (RunConfig.jpeg_draft): what it saves and what it changes, in one run.

The images: CIFAR-10 training rows upscaled (bicubic) to 4:3 JPEGs (quality 90) whose short side is --side-factors
times a resize target, with full-resolution Gaussian grain (--grain, a standard deviation on [0, 1] pixels) so that
they carry detail finer than the drafted scale, as photos do: an upscaled 32-px image has almost none there, which
would flatter the draft. Factors 2.5, 5 and 10 draft at 1/2, 1/4 and 1/8 of the full scale. (ImageNet's typical
500x375 is 1.67 times 224 and never drafts; a 4032x3024 phone photo is 13.5 times.)

1. Speed, at the geometry of CLIPImageProcessor's defaults (a 224-px target): decode + preprocess in one process
   (hf_clipsel.embedding.prepare_batch and Preprocessing.finish: the DataLoader worker's and the main process's
   share of every batch), full against drafted, interleaved, median of --repeats.
2. Ranks: SAS against the class prompts ("a photo of a {}.") and SDS (K = --knn-k) from --model_name_or_path through
   hf_clipsel.embedding.embed_images with and without jpeg_draft, on JPEGs made for that model's resize target; the
   Spearman rank correlation of each. The package turns jpeg_draft on by default only if both are >= 0.999.
3. The damage check, at the 224-px geometry: --damaged-share of the rows get full-resolution Gaussian noise (std
   0.08) and as many a Gaussian blur (radius 2 px at the 224-px scale, so --side-factor x 2 at full size); the share
   of each flagged noisy / blurry, of the clean rows flagged, and the rows whose flag changes, with full and drafted
   decoding (the statistics are measured on the pixels decoded).

Run on a machine with the Hub (the default model, openai/clip-vit-base-patch32, and uoft-cs/cifar10), or offline
with a local copy of CIFAR-10 and the proxy CLIP that bench_quality.py builds (saved under its --work_dir):

    python recipes/benchmarks/bench_jpeg_draft.py --data_dir path/to/cifar10 \\
        --model_name_or_path path/to/work_dir/proxy-rows8000-epochs12
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import numpy as np
import torch
from _common import DATA_DIR_HELP, cifar10_rows, clip_features, footer, header, interleaved, median, setup, table
from accelerate import Accelerator
from datasets import Dataset, Features, Image
from PIL import Image as PILImage
from PIL import ImageFilter
from scipy.stats import spearmanr

from hf_clipsel.configs import ModelConfig, SelectionConfig
from hf_clipsel.data import decode_rgb, with_row_ids
from hf_clipsel.embedding import embed_images, pooled_matrix
from hf_clipsel.image_quality import BLURRY, NOISY, damage_flags
from hf_clipsel.modeling import load_clip, model_fingerprint
from hf_clipsel.preprocessing import Preprocessing, prepare_batch, resize_target
from hf_clipsel.scoring import sample_diversity, semantic_alignment

CLIP_TARGET = 224  # CLIPImageProcessor's default shortest edge: the speed and damage parts run at this geometry
NOISE_STD, BLUR_RADIUS = 0.08, 2.0  # the damage, at the target's scale


def make_jpegs(images, target: int, factor: float, grain: float, damage: list[str] | None = None, seed: int = 0):
    """4:3 JPEG cells (quality 90) with a short side of ``factor * target`` and full-resolution grain; row i is
    damaged as ``damage[i]`` says ("", "noise" or "blur"), at full resolution."""
    height = round(factor * target)
    size = (round(height * 4 / 3), height)
    rng = np.random.default_rng(seed)
    # One grain field per geometry, rolled by a random offset per image: drawing 20M normals per 10x image would take
    # longer than the benchmark.
    field = rng.normal(0.0, grain * 255.0, (height, size[0], 1)).astype(np.float32)
    cells = []
    for i, image in enumerate(images):
        pixels = np.asarray(image.convert("RGB").resize(size, PILImage.BICUBIC), dtype=np.float32)
        pixels = pixels + np.roll(field, (int(rng.integers(height)), int(rng.integers(size[0]))), axis=(0, 1))
        if damage and damage[i] == "noise":
            pixels = pixels + rng.normal(0.0, NOISE_STD * 255.0, pixels.shape).astype(np.float32)
        picture = PILImage.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
        if damage and damage[i] == "blur":  # after the grain, as a blur applied to a photo (CIFAR-10-C's way)
            picture = picture.filter(ImageFilter.GaussianBlur(BLUR_RADIUS * factor))
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=90)
        cells.append({"bytes": buffer.getvalue(), "path": None})
    return cells


def speed(cells, image_processor, batch_size: int, repeats: int) -> dict[str, float]:
    """Images/s of decode + preprocess in one process, full and drafted, interleaved."""
    device = torch.device("cpu")

    def run(preprocessing):
        for start in range(0, len(cells), batch_size):
            ready = prepare_batch(cells[start : start + batch_size], preprocessing)
            preprocessing.finish(ready["pixel_values"], device)

    variants = {
        "full": lambda: run(Preprocessing(image_processor)),
        "drafted": lambda: run(Preprocessing(image_processor, jpeg_draft=True)),
    }
    times = interleaved(variants, repeats)
    return {name: len(cells) / median(seconds) for name, seconds in times.items()}


def ranks(cells, labels, model, processor, fingerprint, class_names, batch_size: int, k: int) -> dict[str, float]:
    """Spearman of SAS and SDS between full and drafted decoding, through embed_images."""
    dataset = with_row_ids(Dataset.from_dict({"img": cells}, features=Features({"img": Image()})))
    scores = {}
    for draft in (False, True):
        with tempfile.TemporaryDirectory(prefix="bench_draft_") as cache_dir:
            embeddings = embed_images(
                dataset, "img", model, processor.image_processor, fingerprint, cache_dir, Accelerator(cpu=True),
                batch_size=batch_size, chunk_size=batch_size * -(-len(dataset) // batch_size), jpeg_draft=draft,
            )  # fmt: skip
            images, classes = clip_features(model, processor, pooled_matrix(embeddings), class_names)
        scores[draft] = (
            semantic_alignment(images, classes, labels).numpy(),
            sample_diversity(images, labels, k).numpy(),
        )
    (sas, sds), (sas_drafted, sds_drafted) = scores[False], scores[True]
    return {
        "SAS Spearman": spearmanr(sas, sas_drafted).statistic,
        f"SDS (K={k}) Spearman": spearmanr(sds, sds_drafted).statistic,
        "SAS max abs diff": float(np.abs(sas - sas_drafted).max()),
        "SAS std": float(sas.std()),
    }


def damage(cells, damage_kinds: list[str], image_processor, batch_size: int, threshold: float) -> list[dict]:
    """The damage check's flags from full and drafted decoding: recall per kind, clean rows flagged, rows changed."""
    kinds = np.asarray(damage_kinds)
    flags = {}
    for draft in (False, True):
        preprocessing = Preprocessing(image_processor, jpeg_draft=draft)
        statistics = []
        for start in range(0, len(cells), batch_size):
            batch = prepare_batch(cells[start : start + batch_size], preprocessing, preprocess=False)
            statistics += batch["statistics"]
        noise, contrast, sharpness = (np.asarray(column) for column in zip(*statistics))
        flags[draft] = damage_flags(noise, contrast, sharpness, np.ones(len(cells), dtype=bool), threshold)
    rows = []
    for draft, name in ((False, "full"), (True, "drafted")):
        flag = flags[draft]
        rows.append(
            {
                "decoding": name,
                "noisy rows flagged noisy": float((flag[kinds == "noise"] == NOISY).mean()),
                "blurred rows flagged blurry": float((flag[kinds == "blur"] == BLURRY).mean()),
                "clean rows flagged": float((flag[kinds == ""] != "").mean()),
                "rows whose flag differs from full": int((flag != flags[False]).sum()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="openai/clip-vit-base-patch32")
    parser.add_argument("--data_dir", default=None, help=DATA_DIR_HELP)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--side-factors", type=float, nargs="+", default=[2.5, 5.0, 10.0])
    parser.add_argument("--grain", type=float, default=0.02, help="std of the full-resolution grain, on [0, 1]")
    parser.add_argument("--damaged-share", type=float, default=0.05, help="share of rows noised, and as many blurred")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--knn-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("bench_jpeg_draft: JPEG draft decoding, speed, score ranks and the damage check")
    dataset = cifar10_rows(args.num_images, args.data_dir)
    images, labels = dataset["img"], torch.tensor(dataset["label"][:])
    class_names = dataset.features["label"].names
    model_config = ModelConfig(model_name_or_path=args.model_name_or_path)
    model, processor = load_clip(model_config)
    fingerprint = model_fingerprint(model_config, model)
    model_target = min(resize_target(processor.image_processor))
    from transformers import CLIPImageProcessor

    clip_processor = CLIPImageProcessor()  # the 224-px geometry of the speed and damage parts
    damaged = round(args.damaged_share * len(images))
    damage_kinds = ["noise"] * damaged + ["blur"] * damaged + [""] * (len(images) - 2 * damaged)
    threshold = SelectionConfig().damage_threshold
    speed_rows, rank_rows, damage_rows = [], [], []
    for factor in args.side_factors:
        cells = make_jpegs(images, CLIP_TARGET, factor, args.grain)
        full_size = decode_rgb(cells[0])[0].size
        drafted_size = decode_rgb(cells[0], resize_target(clip_processor))[0].size
        rate = speed(cells, clip_processor, args.batch_size, args.repeats)
        speed_rows.append(
            {
                "side factor": factor,
                "JPEG": f"{full_size[0]}x{full_size[1]}",
                "drafted to": f"{drafted_size[0]}x{drafted_size[1]}",
                "full img/s": rate["full"],
                "drafted img/s": rate["drafted"],
                "speed-up": rate["drafted"] / rate["full"],
            }
        )
        model_cells = cells if model_target == CLIP_TARGET else make_jpegs(images, model_target, factor, args.grain)
        rank_rows.append(
            {
                "side factor": factor,
                **ranks(model_cells, labels, model, processor, fingerprint, class_names, args.batch_size, args.knn_k),
            }
        )
        damaged_cells = make_jpegs(images, CLIP_TARGET, factor, args.grain, damage_kinds, seed=1)
        damage_rows += [
            {"side factor": factor, **row}
            for row in damage(damaged_cells, damage_kinds, clip_processor, args.batch_size, threshold)
        ]
        print(f"side factor {factor} done ({time.perf_counter() - started:.0f} s)")
    print(f"\n## Speed: decode + preprocess, one process, {CLIP_TARGET}-px target (median of {args.repeats})")
    table(speed_rows)
    print(f"\n## Score ranks, full against drafted: {args.model_name_or_path} (resize target {model_target} px)")
    table(rank_rows)
    lowest = min(min(row["SAS Spearman"], row[f"SDS (K={args.knn_k}) Spearman"]) for row in rank_rows)
    print(f"(lowest Spearman {lowest:.4f}; the default would turn on only at >= 0.999)")
    print(
        f"\n## The damage check, {CLIP_TARGET}-px target: {damaged} rows noised (std {NOISE_STD}), {damaged} blurred "
        f"(radius {BLUR_RADIUS} px at target scale), threshold {threshold}"
    )
    table(damage_rows)
    print(f"(N = {len(images)} CIFAR-10 training rows, grain std {args.grain}, batch {args.batch_size})")
    footer(started)


if __name__ == "__main__":
    main()
