"""Offline by construction: no Hub, caches in temporary folders, a tiny CLIP saved to disk so the real
`from_pretrained` path runs, and the small CIFAR-10 fixture committed under tests/data/cifar10 where images matter.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Before datasets / huggingface_hub are imported anywhere: no network, no shared caches.
_CACHE = tempfile.mkdtemp(prefix="hf_clipsel_tests_")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_CACHE, "hf_home")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = REPO / "tests" / "data" / "cifar10"  # 240 train and 50 test rows; provenance in its README


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    from hf_clipsel.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory) -> Path:
    """A copy of the fixture's 240 CIFAR-10 training rows (img: Image, label: ClassLabel), so that a test that
    writes where it should not can never change the committed file."""
    import shutil

    path = tmp_path_factory.mktemp("cifar") / "cifar10_slice.parquet"
    shutil.copyfile(CIFAR10 / "train-00000-of-00001.parquet", path)
    return path


def embedding_chunks(cache_dir: Path) -> list[Path]:
    """The chunk files of the embedding caches under ``cache_dir`` (not those of the pixel statistics beside them)."""
    from hf_clipsel.embedding import STATISTICS_DIR_PREFIX

    chunks = Path(cache_dir).glob("*/chunk-*.arrow")
    return sorted(path for path in chunks if not path.parent.name.startswith(STATISTICS_DIR_PREFIX))


def fast_settings(dataset: Path, model: Path, **overrides) -> dict:
    """Settings for a fast run with the tiny CLIP: few epochs, small batches and chunks (YAML keys)."""
    values = dict(
        dataset_name=str(dataset),
        model_name_or_path=str(model),
        selection_ratios=[0.3, 0.5],
        knn_k=5,
        adapter_epochs=2,
        adapter_batch_size=64,
        batch_size=32,
        embedding_chunk_size=64,
    )
    return {**values, **overrides}


def run_config(dataset: Path, model: Path, output_dir: Path, **overrides):
    from hf_clipsel.configs import ClipselConfig

    return ClipselConfig.from_flat(fast_settings(dataset, model, output_dir=str(output_dir), **overrides))


def write_config(path: Path, dataset: Path, model: Path, **overrides) -> Path:
    """The fast settings as a YAML file for `--config`."""
    import yaml

    path.write_text(yaml.safe_dump(fast_settings(dataset, model, **overrides)))
    return path


def cli(*args: str, launcher: tuple[str, ...] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    """`hf-clipsel` in a subprocess (``launcher`` e.g. `accelerate launch ...` puts `-m hf_clipsel.cli` behind it)."""
    program = [*launcher, "-m", "hf_clipsel.cli"] if launcher else [sys.executable, "-m", "hf_clipsel.cli"]
    return subprocess.run([*program, *args], capture_output=True, text=True, env=env)
