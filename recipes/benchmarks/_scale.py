"""`bench_selection.py --parts scale`: scoring and selection out of core at ImageNet-21k's size.

The parent writes a synthetic embedding cache in the library's own format (Arrow chunk files of ``row_id``,
``vision_pooled`` [D], ``decode_ok``, ``decode_error``, as hf_clipsel.embedding writes them, and the pixel
statistics beside them: synthetic numbers and random uint8 thumbnails) with Zipf-like class sizes, the largest
``--largest`` rows, and a tiny CLIP whose projection is D x D. A fresh child process then runs the library's score
stage on it, out of core: hf_clipsel.scores_table.feature_store (projection per block into the class-sorted feature
store), measured_statistics (the thumbnails into a uint8 store beside it), score_values (every registered score and
the predicted label), scores_table (the table, on a Source whose labels hf_clipsel.data.resolve_labels resolved, held
through scoring as a run holds it) and select_stage (exact, five ratios), and reports the kernel's high-water mark of
its resident memory (VmHWM, reset before scoring). ``--store-dtype float16`` writes the feature store in float16, as
``ScoringConfig.feature_store_dtype`` does in a run (the size of its file is reported).

The class-text terms (alignment, class posterior, predicted label) need ``[N, C]`` logits: at C = 21,000 and d = 768
that is 2 N C d = 3.2e16 FLOP per million rows, days on 2 CPU cores. They run with ``--text-classes`` text classes
(row i's text class is its class modulo that count, so their per-row cost is the library's at that C), and a second
child scores ``--probe-rows`` rows twice, with ``--text-classes`` and with 21,000 text classes: the difference is their
cost at 21,000 classes, EXTRAPOLATED linearly in N to a cost per million rows (they are per-row). The duplicate
search groups rows by their given class on the data's classes (ImageNet-21k's shape), not on those text classes:
on those it would search ``--text-classes`` classes of N / text classes rows each, in cells whose cost per row grows
with N.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch
from _common import load_average, reset_peak, status_gib, table
from datasets import Dataset, concatenate_datasets
from datasets.arrow_writer import ArrowWriter

IMAGENET21K_ROWS, IMAGENET21K_CLASSES = 13_000_000, 21_000
CHUNK_ROWS = 65_536


def class_sizes(rows: int, classes: int, largest: int) -> np.ndarray:
    """Zipf-like sizes ``largest * rank**-a`` (the exponent solved so they sum to ``rows``), at least 1 each."""
    if not classes <= rows <= classes * largest:
        raise ValueError(f"{rows} rows cannot fill {classes} classes of 1..{largest} rows.")
    ranks = np.arange(1, classes + 1, dtype=np.float64)
    low, high = 0.0, 30.0
    for _ in range(100):
        exponent = (low + high) / 2
        low, high = (exponent, high) if np.maximum(1, largest * ranks**-exponent).sum() > rows else (low, exponent)
    sizes = np.maximum(1, np.floor(largest * ranks**-exponent)).astype(np.int64)
    order = np.argsort(-sizes, kind="stable")
    while sizes.sum() != rows:  # the rounding remainder, one row per class from the largest down
        step = 1 if sizes.sum() < rows else -1
        room = order[(sizes[order] < largest) if step > 0 else (sizes[order] > 1)]
        sizes[room[: abs(int(rows - sizes.sum()))]] += step
    return sizes


def build_cache(work: Path, rows: int, dim: int, classes: int, largest: int, seed: int = 0) -> dict:
    """The synthetic cache (class centre plus noise, rows in shuffled class order), its labels and a tiny CLIP."""
    from hf_clipsel.embedding import VISION_POOLED, embedding_features
    from hf_clipsel.features import rows_per_block
    from hf_clipsel.tiny import build_tiny_clip

    shutil.rmtree(work, ignore_errors=True)
    (work / "cache").mkdir(parents=True)
    sizes = class_sizes(rows, classes, largest)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(classes), sizes))
    np.save(work / "labels.npy", labels)
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    features = embedding_features(dim)
    num_chunks = -(-rows // CHUNK_ROWS)
    for index, start in enumerate(range(0, rows, CHUNK_ROWS)):
        stop = min(start + CHUNK_ROWS, rows)
        vectors = torch.randn(stop - start, dim, generator=generator).mul_(0.5)
        vectors += centres[torch.from_numpy(labels[start:stop])]
        flat = pa.array(vectors.numpy().reshape(-1), type=pa.float32())
        columns = {
            "row_id": pa.array(np.arange(start, stop)),
            VISION_POOLED: pa.FixedSizeListArray.from_arrays(flat, dim),
            "decode_ok": pa.array(np.ones(stop - start, dtype=bool)),
            "decode_error": pa.array([""] * (stop - start)),
        }
        path = work / "cache" / f"chunk-{index:05d}-of-{num_chunks:05d}.arrow"
        # record batches of a block of features, as hf_clipsel.embedding leaves its cache files
        with ArrowWriter(features=features, path=str(path), writer_batch_size=rows_per_block(dim)) as writer:
            writer.write_table(pa.table(columns, schema=features.arrow_schema))
            writer.finalize()
    write_statistics(work, rows, seed + 1)
    build_tiny_clip(work / "model", hidden_size=dim, projection_dim=dim, num_layers=1)
    weights = sizes.astype(np.float64)
    return {
        "classes": classes,
        "largest class": int(sizes.max()),
        "mean class size per row": float(weights @ weights / rows),  # the kNN's work per row grows with it
    }


def write_statistics(work: Path, rows: int, seed: int) -> None:
    """The pixel statistics beside the cache, as the embed stage caches them (one Arrow file per chunk of ``row_id``
    and every measured column): synthetic, a gamma-distributed number per row, or a random uint8 descriptor (the
    duplicate score's thumbnail: random grids, so it finds next to no duplicates, but compares every pair)."""
    from hf_clipsel.embedding import statistics_features
    from hf_clipsel.scores import measured_specs

    (work / "statistics").mkdir(exist_ok=True)
    features = statistics_features()
    rng = np.random.default_rng(seed)
    num_chunks = -(-rows // CHUNK_ROWS)
    for index, start in enumerate(range(0, rows, CHUNK_ROWS)):
        stop = min(start + CHUNK_ROWS, rows)
        columns = {"row_id": pa.array(np.arange(start, stop))}
        for spec in measured_specs():
            if spec.length is None:
                columns[spec.name] = pa.array(rng.gamma(4.0, 0.05, stop - start).astype(np.float32))
            else:
                grids = rng.integers(0, 256, (stop - start) * spec.length, dtype=np.uint8)
                columns[spec.name] = pa.FixedSizeListArray.from_arrays(pa.array(grids), spec.length)
        path = work / "statistics" / f"chunk-{index:05d}-of-{num_chunks:05d}.arrow"
        with ArrowWriter(features=features, path=str(path), writer_batch_size=CHUNK_ROWS) as writer:  # one batch
            writer.write_table(pa.table(columns, schema=features.arrow_schema))
            writer.finalize()


def child(work: Path, text_classes: int, knn_k: int, store_dtype: str = "float32") -> None:
    """Score and select on the cache of ``work`` (a fresh process), the feature store in ``store_dtype``; prints one
    JSON line."""
    from transformers import CLIPModel

    from hf_clipsel.configs import ClipselConfig
    from hf_clipsel.features import FeatureStore
    from hf_clipsel.modeling import image_features
    from hf_clipsel.scores import ScoreInputs
    from hf_clipsel.scores_table import feature_store, measured_statistics, score_values, scores_table, select_stage
    from hf_clipsel.tables import TABLES_DIR

    labels = np.load(work / "labels.npy")
    rows = len(labels)
    model = CLIPModel.from_pretrained(work / "model").eval()

    def files(folder: str) -> Dataset:
        return concatenate_datasets([Dataset.from_file(str(p)) for p in sorted((work / folder).glob("*.arrow"))])

    # the cached vectors and the pixel statistics beside them, as the embed stage returns them
    embeddings = concatenate_datasets([files("cache"), files("statistics").remove_columns("row_id")], axis=1)
    text = torch.nn.functional.normalize(torch.randn(text_classes, model.config.projection_dim), dim=-1)
    source = synthetic_source(labels)  # held for the whole run, as the pipeline's Source is
    on_given_classes(labels)
    score_seconds = timed_scores()
    resident_before = status_gib("VmRSS")
    read_before = _read_bytes()
    reset_peak()  # the peak of scoring and selection alone
    started = time.perf_counter()
    with torch.no_grad():
        path = work / f"features.f{np.dtype(store_dtype).itemsize * 8}"
        store = feature_store(
            embeddings, lambda pooled: image_features(model, torch.from_numpy(pooled)), labels, path, dtype=store_dtype
        )
        store_gib = path.stat().st_size / 1024**3
        # as scores_table.score_stage reads them: numbers per row in memory, the thumbnails in a store beside
        statistics = measured_statistics(embeddings, store)
        # the disk the score stage holds beside the cache: the features' store and the thumbnails' stores
        stores_gib = sum(p.stat().st_size for p in work.glob(f"{path.stem}*")) / 1024**3
        projected = time.perf_counter()
        inputs = ScoreInputs(
            features=store,
            class_features=text,
            labels=torch.from_numpy(labels % text_classes),  # the class-text terms' classes (diversity: the store's)
            valid=torch.ones(rows, dtype=torch.bool),
            logit_scale=100.0,
            knn_k=knn_k,
            statistics=statistics,
        )
        columns = score_values(inputs)
    del inputs, statistics  # as scores_table.score_stage lets them go before it builds the table
    scored = time.perf_counter()
    # the library's own table: a file in the run's cache (tables.TABLES_DIR), read through its memory map
    scores = scores_table(SimpleNamespace(source=source, cache_dir=work), embeddings, columns)
    del columns  # as score_stage lets them go when it returns the table (which holds its own copy, in its file)
    config = ClipselConfig.from_flat({"selection_ratios": [0.1, 0.3, 0.5, 0.7, 0.9]})
    # as the pipeline selects: the selection's columns go to files in the run's cache (tables.TABLES_DIR)
    masks, selection = select_stage(scores, config, store, work / TABLES_DIR)
    selected = time.perf_counter()
    assert isinstance(store, FeatureStore) and all(masks[r].any() for r in masks)
    figures = {
        "store dtype": store_dtype,
        "feature store GiB": store_gib,
        "feature + thumbnail stores GiB": stores_gib,
        "RSS before scoring GiB": resident_before,
        "peak_rss_gib": status_gib("VmHWM"),
        "project + store s": projected - started,
        "scores s": scored - projected,
        "table + select s": selected - scored,
        # each registered score's compute (the rest of "scores s": the predicted label, a pass over the store)
        "seconds per score": {name: round(seconds, 1) for name, seconds in score_seconds.items()},
        "seconds": selected - started,
        # bytes the kernel read from disk for this process while scoring and selecting: what a store or a cache that
        # no longer fits the page cache costs (0 when every file is cached, as at 1M rows after the build)
        "disk read GiB": (_read_bytes() - read_before) / 1024**3,
        # per row (Arrow's bytes): the scores table, and the same with the selection's columns; both in files this
        # process maps, resident only while read
        "scores table bytes a row": scores.data.nbytes / rows,
        "selected table bytes a row": selection.data.nbytes / rows,
    }
    print(json.dumps(figures))


def on_given_classes(labels: np.ndarray) -> None:
    """The duplicate score's search (``find_duplicates``, whose third argument is each row's given class) on the
    data's ``labels``: the score inputs' labels are the class-text terms' (``labels % text_classes``, so that they
    index the text features), and the search would otherwise find 100 classes of N / 100 rows (the default
    ``--text-classes``), where a run on ImageNet-21k has 21,000 of about 620."""
    import hf_clipsel.scores.duplicate as duplicate_score

    search, given = duplicate_score.find_duplicates, torch.from_numpy(labels)

    def searched(image_features, class_features, _text_labels, *args, **kwargs):
        return search(image_features, class_features, given, *args, **kwargs)

    duplicate_score.find_duplicates = searched


def timed_scores() -> dict[str, float]:
    """Each registered score's ``compute`` timed from here on: ``{score name: seconds}``, filled as they run."""
    from hf_clipsel.scores import registered_scores

    seconds: dict[str, float] = {}
    for score in registered_scores():

        def timed(inputs, compute=score.compute, name=score.name):
            started = time.perf_counter()
            try:
                return compute(inputs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started

        score.compute = timed  # on the registered instance: its class, and so the library, are untouched
    return seconds


def synthetic_source(labels: np.ndarray):
    """A :class:`hf_clipsel.data.Source` of ``labels`` (a ClassLabel column): its labels, label problems and given
    labels as the library resolves them (hf_clipsel.data.resolve_labels); a stream, so that the table's image paths
    are all "" as the library writes them for one (the synthetic cache has no image files)."""
    from datasets import ClassLabel, DatasetInfo, Features
    from datasets.table import InMemoryTable

    from hf_clipsel.data import Source, resolve_labels

    info = DatasetInfo(features=Features({"label": ClassLabel(names=[f"c{i}" for i in range(int(labels.max()) + 1)])}))
    column = Dataset(InMemoryTable(pa.table({"label": labels})), info=info)
    names, resolved, problems, given = resolve_labels(column, "label", None)
    stream = Dataset.from_dict({"image": [None]}).to_iterable_dataset()
    return Source(stream, "image", "label", names, resolved, problems, given)


def big_class_child(work: Path, rows: int, dim: int, knn_k: int, block_rows: int) -> None:
    """One class of ``rows`` rows in a feature store file, scored as the diversity score scores a class larger than
    ``knn_block_rows`` (queries and keys in blocks); prints one JSON line."""
    from hf_clipsel import scoring
    from hf_clipsel.features import FeatureStore

    work.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(np.zeros(rows, dtype=np.int64), dim, work / "big-class.f32")
    generator = torch.Generator().manual_seed(0)
    for start in range(0, rows, store.block_rows):
        store.write(start, torch.randn(min(store.block_rows, rows - start), dim, generator=generator).numpy())
    members = np.arange(rows)
    reset_peak()
    started = time.perf_counter()
    diversity = scoring.class_diversity(lambda a, b: store.rows(members[a:b]), rows, knn_k, block_rows)
    seconds = time.perf_counter() - started
    assert bool(torch.isfinite(diversity).all())
    figures = {"class rows": rows, "knn_block_rows": block_rows, "peak_rss_gib": status_gib("VmHWM")}
    figures.update({"seconds": seconds, "EXTRAPOLATED s for 3M rows (x n^2)": seconds * (3e6 / rows) ** 2})
    print(json.dumps(figures))


def _read_bytes() -> int:
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("read_bytes:")).split()[1])


def _run_child(script: str, work: Path, args: list[str]) -> dict:
    command = [sys.executable, script, "--scale-child", str(work), *args]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def part_scale(script: str, args) -> dict:
    rows, dim = args.rows, args.dim
    classes = args.classes or max(1, round(IMAGENET21K_CLASSES * rows / IMAGENET21K_ROWS))
    work = Path(args.work_dir)
    threads = ["--threads", str(args.threads)] if args.threads else []
    print(f"\n## scale: {rows:,} x {dim} synthetic embeddings, {classes:,} classes (largest {args.largest:,} rows)")
    print(load_average())
    started = time.perf_counter()
    shape = build_cache(work, rows, dim, classes, args.largest)
    built = time.perf_counter() - started
    cache_gib = sum(p.stat().st_size for p in (work / "cache").glob("*.arrow")) / 1024**3
    print(f"cache built in {built:.0f} s: {cache_gib:.2f} GiB on disk; {shape}")
    scoring = ["--knn-k", str(args.knn_k), *threads]
    store = ["--store-dtype", args.store_dtype]
    figures = _run_child(script, work, ["--text-classes", str(args.text_classes), *scoring, *store])
    result = {"rows": rows, "dim": dim, **shape, "text classes": args.text_classes, "knn_k": args.knn_k, **figures}
    result["seconds per million rows"] = figures["seconds"] / (rows / 1e6)
    print(load_average())
    if args.probe_rows:  # the class-text terms at 21,000 classes, on a small cache
        probe = work.with_name(work.name + "-probe")
        build_cache(probe, args.probe_rows, dim, min(classes, args.probe_rows), args.largest)
        times = {
            count: _run_child(script, probe, ["--text-classes", str(count), *scoring, *store])
            for count in (args.text_classes, IMAGENET21K_CLASSES)
        }
        extra = times[IMAGENET21K_CLASSES]["scores s"] - times[args.text_classes]["scores s"]
        result["probe rows"] = args.probe_rows
        result["EXTRAPOLATED text terms at 21,000 classes, s per million rows"] = extra / (args.probe_rows / 1e6)
        shutil.rmtree(probe, ignore_errors=True)
    table([result])
    if args.big_class:
        big = _run_child(script, work, ["--big-class", str(args.big_class), "--dim", str(dim), *scoring,
                                        "--knn-block-rows", str(args.knn_block_rows)])  # fmt: skip
        table([big])
        result["one big class"] = big
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(load_average())
    return result
