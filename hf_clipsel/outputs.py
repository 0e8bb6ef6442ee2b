"""Write a run's outputs, laid out as a Hub dataset repo, so that `load_dataset(output_dir, "ratio_0.3")` reads a
subset locally and the same folder can be uploaded as it is (the layout: README.md, "Outputs"):

    README.md, run_record.json, run_config.yaml, run_summary.json, scores/, subsets/ratio_<r>/, adapter/, report/,
    embeddings/ (the cache, not part of the dataset repo)

The writers here write into a folder that the run record's RunFolder stages beside the run and swaps in whole
(hf_clipsel.runs.folder); each directory is also written beside its place and renamed into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import yaml
from datasets import Dataset, Image
from datasets.table import embed_table_storage

from .core.names import (  # noqa: F401  (the folder's entries, named where every layer can read them)
    ADAPTER_DIR,
    EMBEDDINGS_DIR,
    REPORT_DIR,
    REPORT_FIGURES,
    RUN_CONFIG,
    RUN_SUMMARY,
    SCORES_DIR,
    SUBSETS_DIR,
    ratio_name,
)

RUN_RECORD_KEYS = ("versions", "command", "source")  # written beside the settings in run_config.yaml
MAX_SHARD_BYTES = 500 * 2**20
DIGEST_LENGTH = 12
SHARD_NAME = re.compile(rf"[^-]+-(?P<tag>[0-9a-f]{{{DIGEST_LENGTH}}})-\d{{5}}-of-\d{{5}}\.parquet")


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling of ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a run that was killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    temporary = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.replace(final, old)
    os.replace(temporary, final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic_text(path: Path, text: str) -> None:
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.write_text(text)
    os.replace(temporary, path)


class ShardWriter:
    """Writes datasets into ``directory`` as self-contained parquet shards (image files referenced by path are
    embedded), named ``<split>-<digest>-<i>-of-<n>.parquet`` on :meth:`close`, with a digest of their bytes.

    The digest is there because `datasets` caches a local folder's YAML configs by their file patterns, not the
    files' contents: a pattern that names the content makes `load_dataset(output_dir, config)` read the new rows
    after a rerun instead of the cached old ones (datasets 5.2).
    """

    def __init__(self, directory: Path, split: str = "train"):
        self.directory, self.split = Path(directory), split
        self.drafts: list[Path] = []

    def add(self, dataset: Dataset) -> None:
        scratch = None
        if any(isinstance(feature, Image) for feature in dataset.features.values()):
            # The map's cache file goes here, never beside the source's own files (a `save_to_disk` folder, maybe
            # read-only): the source is never written into.
            scratch = self.directory / f".images-{len(self.drafts):05d}.arrow"
            dataset = dataset.with_format("arrow").map(
                embed_table_storage, batched=True, cache_file_name=str(scratch), desc="Embedding image bytes"
            )
            dataset = dataset.with_format(None)
        size = dataset.data.nbytes * len(dataset) / max(len(dataset.data), 1)
        num_shards = max(1, math.ceil(size / MAX_SHARD_BYTES))
        for index in range(num_shards):
            draft = self.directory / f".draft-{len(self.drafts):05d}.parquet"
            dataset.shard(num_shards, index, contiguous=True).to_parquet(str(draft))
            self.drafts.append(draft)
        if scratch is not None:
            del dataset
            scratch.unlink(missing_ok=True)

    def close(self) -> list[Path]:
        digest = hashlib.sha256()
        for draft in self.drafts:
            digest.update(draft.read_bytes())
        tag, total = digest.hexdigest()[:DIGEST_LENGTH], len(self.drafts)
        paths = [self.directory / f"{self.split}-{tag}-{i:05d}-of-{total:05d}.parquet" for i in range(total)]
        for draft, path in zip(self.drafts, paths):
            os.replace(draft, path)
        return paths


def write_parquet_shards(dataset: Dataset, directory: Path, split: str = "train") -> list[Path]:
    """Write ``dataset`` into ``directory`` with a :class:`ShardWriter`."""
    writer = ShardWriter(directory, split)
    writer.add(dataset)
    return writer.close()


def data_files_pattern(directory: Path, relative_to: Path) -> str:
    """The glob that names exactly the shards in ``directory`` (see :func:`write_parquet_shards`)."""
    names = [SHARD_NAME.fullmatch(path.name) for path in directory.glob("*.parquet")]
    tags = {name.group("tag") if name else None for name in names}
    relative = directory.relative_to(relative_to).as_posix()
    if len(tags) == 1 and None not in tags:
        return f"{relative}/*-{tags.pop()}-*.parquet"
    return f"{relative}/*.parquet"  # files written by other means: no content tag to name


def write_scores(output_dir: Path, scores: Dataset) -> None:
    with atomic_directory(Path(output_dir) / SCORES_DIR) as directory:
        write_parquet_shards(scores, directory, split="scores")


def write_subsets(output_dir: Path, dataset_with_ids: Dataset, masks: dict) -> dict[float, int]:
    """One directory per ratio with the selected rows in source order; stale ratios are removed."""
    subsets = Path(output_dir) / SUBSETS_DIR
    written = {}
    for ratio, mask in masks.items():
        rows = [int(i) for i in mask.nonzero()[0]]
        with atomic_directory(subsets / ratio_name(ratio)) as directory:
            write_parquet_shards(dataset_with_ids.select(rows), directory)
        written[ratio] = len(rows)
    remove_stale_subsets(output_dir, masks)
    return written


def remove_stale_subsets(output_dir: Path, ratios) -> None:
    """Subsets of ratios this run did not select: an earlier run's, which the new card would not list."""
    keep = {ratio_name(r) for r in ratios}
    for stale in (Path(output_dir) / SUBSETS_DIR).glob("ratio_*"):
        if stale.name not in keep:
            shutil.rmtree(stale)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in (
        "hf-clipsel",
        "torch",
        "transformers",
        "datasets",
        "accelerate",
        "peft",
        "huggingface_hub",
        "timm",
        "evaluate",
    ):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return versions


def write_run_config(output_dir: Path, flat_config: dict, command: list[str] | None = None) -> None:
    content = dict(flat_config)
    content["versions"] = library_versions()
    if command:
        content["command"] = " ".join(command)
    write_atomic_text(Path(output_dir) / RUN_CONFIG, yaml.safe_dump(content, sort_keys=False))


def read_run_config(output_dir: Path) -> dict | None:
    path = Path(output_dir) / RUN_CONFIG
    return yaml.safe_load(path.read_text()) if path.exists() else None


def dataset_configs(output_dir: Path, ratios: list[float]) -> list[dict]:
    """The card's YAML `configs:` entries that make `load_dataset(output_dir, name)` work.

    One config per ratio (``load_dataset(output_dir, "ratio_0.3")``, split ``train``) and ``scores``; and a default
    config with every ratio as a split of its own (``load_dataset(output_dir, split="ratio_0.3")``), because timm's
    ``hfds/`` reader calls ``load_dataset(repo, split=...)`` without a config name.
    """
    output_dir = Path(output_dir)
    directories = {ratio_name(r): output_dir / SUBSETS_DIR / ratio_name(r) for r in ratios}
    directories["scores"] = output_dir / SCORES_DIR
    patterns = {name: data_files_pattern(path, output_dir) for name, path in directories.items()}
    configs = [
        {"config_name": name, "data_files": [{"split": "train", "path": pattern}]}
        for name, pattern in patterns.items()
    ]
    if ratios:
        splits = [{"split": ratio_name(r), "path": patterns[ratio_name(r)]} for r in ratios]
        configs.insert(0, {"config_name": "default", "data_files": splits, "default": True})
    return configs


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0
