"""Embedding throughput: hf_clipsel.embedding.embed_images against the bare vision-tower forward, fp32 and bf16.

The model is the ViT-B/32 architecture (CLIPConfig defaults) with RANDOM weights (no Hub here), saved to disk and
loaded by hf_clipsel.modeling.load_clip like a real checkpoint. The images are the first --num-images rows of a
real CIFAR-10 parquet shard (32 px PNGs, resized to 224 px by CLIPImageProcessor's defaults).

- embed_images: the library's whole path (datasets.map under Accelerate, PNG decode, processor, forward, cache
  write to a fresh cache directory every run).
- bare forward: vision_tower_outputs on the same pixel values, preprocessed beforehand (not timed).
The two are interleaved, median of --repeats; target: embed_images throughput >= 0.9x the bare forward.
Decode and processor are also timed alone (interleaved with the others), to say what the difference is made of.

Scores: SAS against the class prompts ("a photo of a {}.") and SDS (K = --knn-k) from the fp32 and the bf16 run, and
the Spearman rank correlation between them (target >= 0.999). Only the image tower differs between the two runs:
load_clip keeps the text tower and the projections in fp32 whatever the dtype. With random weights these scores
carry no meaning, and their spread may differ from a trained CLIP's: read the correlation as an upper bound on
bf16's effect only if the spread is comparable (the script prints it).

Default runtime on a 2-core CPU: about 5 minutes (N = 256). Scale up: --num-images 4096 --batch-size 256 on a GPU.

`--case decode` measures the decode-bound case instead: ImageNet-like JPEGs (the CIFAR-10 images resized to 500x375,
quality 90; cycled when --num-images exceeds the rows read) and a tiny CLIP tower at 224 px (hf_clipsel.tiny, a
forward of thousands of images/s), so that decoding and preprocessing are the limit, as on a GPU. In one run,
interleaved: decode + preprocess alone in one process (hf_clipsel.embedding.prepare_batch and Preprocessing.finish),
the same through a DataLoader with 2 workers and no forward (the decode-only bound; also the workers alone, without
the main process's normalisation), the forward alone on prepared pixels (the forward-only bound), and embed_images
end to end with preprocessing_num_workers 0, 1 and 2 at each --chunk-size (several may be given: one loader
serves all of a process's chunks, so 256-row chunks should run as fast as one big chunk). About 2.5 minutes for
N = 2048 and one chunk size on a quiet host.

`--case decode --device cuda` is the same on a GPU with the ViT-B/32 architecture (random weights, the package's
default dtype there: bfloat16) and, end to end, 0 workers and the package's default number; it prints bare-forward,
decode-only and end-to-end images/s and the ImageNet-1k time derived from them. It reads the repository's own
fixture, so it runs where the Hub cannot be reached (a few minutes on one GPU):

    python recipes/benchmarks/bench_embedding.py --case decode --device cuda --num-images 4096 \
        --data_dir tests/data/cifar10 --batch-size 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial

import numpy as np
import torch
from _common import (
    DATA_DIR_HELP,
    MODEL_DIR,
    build_vit_b32,
    cifar10_rows,
    clip_features,
    footer,
    header,
    interleaved,
    load_1min,
    load_average,
    load_cifar10,
    median,
    setup,
    table,
)
from accelerate import Accelerator
from datasets import Image
from scipy.stats import spearmanr

from hf_clipsel.configs import ModelConfig
from hf_clipsel.data import decode_rgb
from hf_clipsel.embedding import embed_images, pooled_matrix
from hf_clipsel.modeling import load_clip, model_fingerprint, vision_tower_outputs
from hf_clipsel.preprocessing import ChunkWork, Preprocessing, prepare_batch, prepared_chunks
from hf_clipsel.scoring import sample_diversity, semantic_alignment


def decode_all(cells) -> list:
    return [decode_rgb(cell)[0] for cell in cells]


def process_all(images: list, processor, batch_size: int) -> list[torch.Tensor]:
    return [
        processor(images=images[i : i + batch_size], return_tensors="pt").pixel_values
        for i in range(0, len(images), batch_size)
    ]


def bare_forward(model, batches) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([vision_tower_outputs(model, pixels) for pixels in batches]).cpu()  # .cpu(): synchronised


def library_embed(
    dataset, model, processor, fingerprint, accelerator, batch_size: int, workdir: str, num_workers: int = 0
) -> torch.Tensor:
    with tempfile.TemporaryDirectory(dir=workdir) as cache_dir:  # a fresh cache: nothing is reused between runs
        embeddings = embed_images(
            dataset,
            "img",
            model,
            processor,
            fingerprint,
            cache_dir,
            accelerator,
            batch_size=batch_size,
            chunk_size=batch_size * -(-len(dataset) // batch_size),
            num_workers=num_workers,
        )
        return pooled_matrix(embeddings)


def compare(name: str, reference: np.ndarray, other: np.ndarray) -> dict:
    return {
        "score": name,
        "Spearman vs fp32": spearmanr(reference, other).statistic,
        "fp32 std": float(reference.std()),
        "max abs diff": float(np.abs(reference - other).max()),
    }


def _store(results: dict, key: str, fn, *args) -> None:
    results[key] = fn(*args)


def imagenet_like(dataset, num_images: int, side=(500, 375), quality: int = 90):
    """``num_images`` JPEGs of ImageNet's typical size made from the dataset's images (cycled if it has fewer), with
    row_id: the decode-bound case."""
    import io

    from datasets import Dataset, Features, Value
    from PIL import Image as PILImage

    from hf_clipsel.data import with_row_ids

    def encode(image) -> bytes:
        buffer = io.BytesIO()
        image.convert("RGB").resize(side, PILImage.BICUBIC).save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()

    cells = [{"bytes": encode(image), "path": None} for image in dataset["img"]]
    labels = dataset["label"][:]
    rows = [i % len(cells) for i in range(num_images)]
    features = Features({"img": Image(), "label": Value("int64")})
    return with_row_ids(
        Dataset.from_dict({"img": [cells[i] for i in rows], "label": [labels[i] for i in rows]}, features=features)
    )


def decode_case(args) -> None:
    """The decode-bound case (see the module docstring): throughputs and their ratios, in one run. On a CPU the
    tower is a tiny CLIP at 224 px; with --device cuda it is ViT-B/32 (random weights, the default dtype: bfloat16)."""
    from hf_clipsel.embedding import preprocessing_workers
    from hf_clipsel.tiny import build_tiny_clip

    device = torch.device(args.device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    source = load_cifar10(args.data_dir, split="train")
    source = source.select(range(min(args.num_images, len(source))))
    dataset = imagenet_like(source, args.num_images)
    workers = args.workers or ([0, 1, 2] if device.type == "cpu" else [0, preprocessing_workers(None, accelerator)])
    bound_workers = max(workers)
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as workdir:
        if device.type == "cpu":
            checkpoint = str(build_tiny_clip(f"{workdir}/clip", image_size=224))
        else:
            checkpoint = build_vit_b32(args.model_dir)
        model_config = ModelConfig(model_name_or_path=checkpoint)
        model, processor = load_clip(model_config, device)
        model.to(device)
        fingerprint, image_processor = model_fingerprint(model_config, model), processor.image_processor
        chunk = dataset.select_columns(["row_id", "img"]).cast_column("img", Image(decode=False))
        cells, size = chunk["img"], args.batch_size
        preprocessing = Preprocessing(image_processor)

        def preprocess(cells_of_batch):  # the whole CPU side of a batch: decode, measure, preprocess, normalise
            ready = prepare_batch(cells_of_batch, preprocessing)
            return preprocessing.finish(ready["pixel_values"], device).clone()  # finish reuses its buffer

        prepared = [preprocess(cells[i : i + size]) for i in range(0, len(cells), size)]  # on the device

        def decode_serial():
            for start in range(0, len(cells), size):
                preprocessing.finish(prepare_batch(cells[start : start + size], preprocessing)["pixel_values"], device)
            synchronize(device)

        def decode_workers(workers: int, normalise: bool = True):
            """The workers' half (decode, measure, preprocess to uint8) and the main process's copy to the device and
            normalisation, as in embed_images, without the forward; ``normalise=False``: the workers alone."""
            work = iter([ChunkWork(0, chunk, 0, preprocess=True, measure=True)])
            pin = device.type == "cuda"
            _, loader = next(prepared_chunks(work, chunk, "img", preprocessing, size, workers, pin_memory=pin))
            for ready in loader:
                if normalise:
                    preprocessing.finish(ready["pixel_values"], device)
            synchronize(device)

        def end_to_end(workers: int, chunk_size: int):
            with tempfile.TemporaryDirectory(dir=workdir) as cache_dir:
                embed_images(
                    dataset,
                    "img",
                    model,
                    image_processor,
                    fingerprint,
                    cache_dir,
                    accelerator,
                    batch_size=size,
                    chunk_size=chunk_size,
                    num_workers=workers,
                )

        bare_forward(model, prepared[:1])  # warm-up: first-call allocations and kernel selection
        variants = {
            "decode + preprocess, 1 process": decode_serial,
            f"decode-only bound, {bound_workers} workers": partial(decode_workers, bound_workers),
            f"{bound_workers} workers alone (uint8 out, not normalised)": partial(
                decode_workers, bound_workers, normalise=False
            ),
            "forward-only bound": partial(bare_forward, model, prepared),
            **{end_to_end_name(w, c): partial(end_to_end, w, c) for c in args.chunk_size for w in workers},
        }
        times = interleaved(variants, args.repeats)
    rate = {name: len(dataset) / median(seconds) for name, seconds in times.items()}
    serial, bound = rate["decode + preprocess, 1 process"], rate[f"decode-only bound, {bound_workers} workers"]
    table(
        [
            {"path": name, "img/s": value, "x decode 1 process": value / serial, "x decode-only bound": value / bound}
            for name, value in rate.items()
        ]
    )
    best = rate[end_to_end_name(bound_workers, args.chunk_size[0])]
    limit = min(rate["forward-only bound"], bound)
    per_chunk = ", ".join(f"chunk {c}: {rate[end_to_end_name(bound_workers, c)] / limit:.3f}" for c in args.chunk_size)
    print(
        f"(N = {len(dataset)} JPEGs 500x375, batch {size}, chunks {args.chunk_size}, median of {args.repeats} "
        f"interleaved runs, {torch.get_num_threads()} torch threads in the main process, device {device}, tower "
        f"dtype {next(model.vision_model.parameters()).dtype}. Targets for {bound_workers} workers: >= 1.5x decode 1 "
        "process and >= 0.85x the decode-only bound on a 2-core CPU, whatever the chunk size; on a GPU >= 0.8x "
        f"min(forward-only, decode-only): here {per_chunk}. ImageNet-1k's 1,281,167 images at {best:.0f} img/s: "
        f"{1_281_167 / best / 60:.1f} minutes (DERIVED from this run's rate, not measured on ImageNet))"
    )


def end_to_end_name(workers: int, chunk_size: int) -> str:
    return f"embed_images, {workers} workers, chunks of {chunk_size}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--case", choices=["model", "decode"], default="model", help="model-bound (ViT-B/32) or decode-bound"
    )
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (RunConfig default: 64)")
    parser.add_argument(
        "--chunk-size",
        type=int,
        nargs="+",
        default=[4096],
        help="--case decode: rows per cache chunk, one or more (each runs end to end; RunConfig default: 4096)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median reported)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--knn-k", type=int, default=10, help="K of the SDS compared between dtypes")
    parser.add_argument("--model-dir", default=MODEL_DIR, help="where the random ViT-B/32 is saved (reused)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data_dir", default=None, help=DATA_DIR_HELP)
    parser.add_argument(
        "--device", default="cpu", help="--case decode: cpu (a tiny tower) or cuda (ViT-B/32, bfloat16 by default)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=None,
        help="--case decode: preprocessing_num_workers to run end to end (default: 0 1 2 on a CPU, 0 and the "
        "package default on a GPU); the decode-only bound uses the largest",
    )
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    if args.case == "decode":
        header("bench_embedding --case decode: ImageNet-like JPEGs, a tiny tower; preprocessing_num_workers 0/1/2")
        decode_case(args)
        footer(started)
        return
    header("bench_embedding: embed_images vs bare forward, ViT-B/32 (random weights)")
    model_dir = build_vit_b32(args.model_dir)
    dataset = cifar10_rows(args.num_images, args.data_dir)
    labels = torch.tensor(dataset["label"][:])
    class_names = dataset.features["label"].names
    cells = dataset.cast_column("img", Image(decode=False))["img"]  # undecoded, as embed_images reads them
    accelerator = Accelerator(cpu=True)
    rows, all_features = [], {}
    for dtype in args.dtypes:
        model_config = ModelConfig(model_name_or_path=model_dir, dtype=dtype)
        model, processor = load_clip(model_config)
        fingerprint = model_fingerprint(model_config, model)
        images = decode_all(cells)
        batches = process_all(images, processor.image_processor, args.batch_size)
        bare_forward(model, batches[:1])  # warm-up: first-call allocations and kernel selection
        results = {}
        embed_args = (dataset, model, processor.image_processor, fingerprint, accelerator, args.batch_size)
        variants = {
            "embed_images": partial(_store, results, "library", library_embed, *embed_args, args.model_dir),
            "embed_images, 2 workers": partial(
                _store, results, "library, 2 workers", library_embed, *embed_args, args.model_dir, 2
            ),
            "bare forward": partial(_store, results, "bare", bare_forward, model, batches),
            "decode": partial(decode_all, cells),
            "processor": partial(process_all, images, processor.image_processor, args.batch_size),
        }
        times = interleaved(variants, args.repeats)
        n = len(dataset)
        library_s, bare_s = median(times["embed_images"]), median(times["bare forward"])
        decode_s, process_s = median(times["decode"]), median(times["processor"])
        rows.append(
            {
                "dtype": dtype,
                "N": n,
                "embed_images img/s": n / library_s,
                "bare forward img/s": n / bare_s,
                "ratio (target >= 0.9)": bare_s / library_s,
                "ratio, 2 workers": bare_s / median(times["embed_images, 2 workers"]),
                "embed_images ms/img": 1e3 * library_s / n,
                "forward ms/img": 1e3 * bare_s / n,
                "decode ms/img": 1e3 * decode_s / n,
                "processor ms/img": 1e3 * process_s / n,
                "max abs diff pooled": float((results["library"] - results["bare"]).abs().max()),
                "max abs diff, 2 workers": float((results["library, 2 workers"] - results["bare"]).abs().max()),
                "load (1 min)": load_1min(),
            }
        )
        all_features[dtype] = clip_features(model, processor, results["library"], class_names)
        print(load_average(), "|", dtype, "done")
    table(rows)
    print(
        f"(median of {args.repeats} interleaved runs; batch size {args.batch_size}; {torch.get_num_threads()} threads)"
    )
    if len(all_features) == 2:
        (image32, class32), (image16, class16) = all_features["float32"], all_features["bfloat16"]
        sas32 = semantic_alignment(image32, class32, labels).numpy()
        sds32 = sample_diversity(image32, labels, args.knn_k).numpy()
        table(
            [
                compare("SAS (bf16 run)", sas32, semantic_alignment(image16, class16, labels).numpy()),
                compare(
                    f"SDS, K={args.knn_k} (bf16 run)", sds32, sample_diversity(image16, labels, args.knn_k).numpy()
                ),
            ]
        )
        print("(target: Spearman >= 0.999)")
    footer(started)


if __name__ == "__main__":
    main()
