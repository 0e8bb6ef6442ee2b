"""Helpers shared by the benchmark scripts: the machine line, load average, thread count, timing, tables.

Benchmarks are not tests. Each script prints what it measured, the command that reproduces it and the machine it ran
on; recipes/benchmarks/README.md records those figures.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_clipsel.thumbnails import CROP_SIDE, THUMBNAIL_SIDE


def setup(threads: int | None) -> None:
    """Fix torch's intra-op thread count (default: torch's own choice, one per core) before any work."""
    if threads:
        torch.set_num_threads(threads)


def load_average() -> str:
    return "load average {:.2f}, {:.2f}, {:.2f} (1, 5, 15 min)".format(*os.getloadavg())


def load_1min() -> float:
    return round(os.getloadavg()[0], 2)


def status_gib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (kB, e.g. ``VmRSS``, ``VmHWM``), in GiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024**2


def reset_peak() -> None:
    """Reset the kernel's high-water mark of this process's resident memory: ``VmHWM`` is the peak from here on."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"python {platform.python_version()}, no GPU" + ("" if not torch.cuda.is_available() else " (CUDA available)")
    )


def cpu_probe(seconds: float = 0.5) -> str:
    """float32 1024x1024 matmul throughput with 1 thread and with torch's threads: what the CPU gives right now.

    The load average only sees this machine's processes; on a shared host, the probe also sees the neighbours.
    """
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    threads = torch.get_num_threads()
    rates = []
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        a @ b  # warm-up
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        rates.append(f"{2 * 1024**3 * runs / (time.perf_counter() - start) / 1e9:.0f} GFLOP/s on {count} thread(s)")
    torch.set_num_threads(threads)
    return "matmul probe " + ", ".join(rates)


def header(title: str) -> None:
    print(f"# {title}")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print("machine: " + machine_line())
    print("start:   " + load_average() + "; " + cpu_probe())


def footer(started: float) -> None:
    runtime = time.perf_counter() - started
    print(f"end:     {load_average()}; {cpu_probe()}; total runtime {runtime:.1f} s")


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def interleaved(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Run each zero-argument callable in ``variants`` once per round, ``repeats`` rounds, alternating the order
    every round so that a change in machine load hits every variant alike. Returns the seconds of every run."""
    times = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            times[name].append(timed(variants[name])[0])
    return times


def imagenet_class_shape(num_classes: int, rows_per_class: int, generator: torch.Generator, dim: int = 512) -> tuple:
    """Synthetic scoring inputs of ImageNet-1k's class shape (``rows_per_class`` rows a class): ``(labels, features,
    text, valid, thumbnails)``, the features near their class centre and the text features near the centres (most
    rows are predicted in their own class), random uint8 thumbnails (hf_clipsel.thumbnails.thumbnail's shape);
    drawn from ``generator`` in that order."""
    labels = torch.arange(num_classes).repeat_interleave(rows_per_class)
    centres = torch.randn(num_classes, dim, generator=generator)
    features = torch.randn(len(labels), dim, generator=generator).mul_(0.5) + centres[labels]
    text = torch.nn.functional.normalize(centres + 0.5 * torch.randn(num_classes, dim, generator=generator), dim=-1)
    valid = torch.ones(len(labels), dtype=torch.bool)
    thumbnails = torch.randint(0, 256, (len(labels), THUMBNAIL_SIDE**2), dtype=torch.uint8, generator=generator)
    return labels, features, text, valid, thumbnails


def crop_candidate_thumbnails(labels: torch.Tensor, share: float, generator: torch.Generator) -> tuple:
    """``(thumbnails, crop_thumbnails)``: uint8 grey grids of hf_clipsel.thumbnails' two sides (8x8 the 2x2 averages
    of the 16x16 ones, as an area average gives them) where a ``share`` of each class's rows come in pairs of
    look-alikes: one grid of the pair is the other's plus noise (thumbnail cosine about 0.7, so that each is the
    other's nearest row and a crop candidate: the share the crop search verifies), the rest random (nearest cosine
    about 0.45 in a class of 1,281: no candidate)."""
    fine = torch.randint(0, 256, (len(labels), CROP_SIDE**2), generator=generator).to(torch.float32)
    _, counts = torch.unique_consecutive(labels, return_counts=True)
    start = 0
    for count in counts.tolist():
        paired = 2 * round(share * count / 2)
        first = torch.arange(start, start + paired, 2)
        noise = 45.0 * torch.randn(len(first), CROP_SIDE**2, generator=generator)
        fine[first + 1] = (fine[first] + noise).clamp(0, 255)
        start += count
    side = CROP_SIDE // THUMBNAIL_SIDE
    small = fine.reshape(-1, THUMBNAIL_SIDE, side, THUMBNAIL_SIDE, side).mean(dim=(2, 4)).reshape(len(labels), -1)
    return small.round().to(torch.uint8), fine.round().to(torch.uint8)


def median(values) -> float:
    return statistics.median(values)


def table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print ``rows`` as a Markdown table (so it can be pasted into the README as is)."""
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for line in cells:
        print("| " + " | ".join(line) + " |")


def _cell(value) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


# The benchmarks read CIFAR-10 from the Hub by default; `--data_dir` names a local copy in the Hub's parquet layout.
CIFAR10_HUB_ID = "uoft-cs/cifar10"
DATA_DIR_HELP = f"a local copy of {CIFAR10_HUB_ID} in the Hub's parquet layout (img, label); default: the Hub"
MODEL_DIR = "/tmp/hf_clipsel_bench/vit_b32_random"


def build_vit_b32(path) -> str:
    """ViT-B/32 CLIP (CLIPConfig defaults) with RANDOM weights, saved with a processor so that
    hf_clipsel.modeling.load_clip loads it through the normal from_pretrained path. Reused if already there."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from hf_clipsel.tiny import BOS, EOS, tiny_tokenizer

    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "processor_config.json").exists():
        return str(path)
    tokenizer = tiny_tokenizer()  # offline: a character-level tokenizer stands in for CLIP's BPE
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (("bos_token_id", BOS), ("eos_token_id", EOS), ("pad_token_id", EOS))
    }
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=ids))  # every other value: the ViT-B/32 defaults
    model.save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def clip_features(model, processor, pooled: torch.Tensor, class_names) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected image features [N, d] of the pooled vision-tower outputs and class prompt features [C, d] ("a photo
    of a {}."), as the score stage computes them."""
    from hf_clipsel.data import class_prompts
    from hf_clipsel.embedding import embed_class_prompts
    from hf_clipsel.modeling import class_text_features, image_features

    with torch.no_grad():
        text_pooled = embed_class_prompts(model, processor.tokenizer, class_prompts(class_names, ["a photo of a {}."]))
        return image_features(model, pooled), class_text_features(model, text_pooled)


def load_cifar10(data_dir: str | None = None, split: str | None = None):
    """CIFAR-10 (columns img, label): ``uoft-cs/cifar10`` from the Hub, or the parquet copy in ``data_dir``."""
    from datasets import load_dataset

    if data_dir:
        return load_dataset("parquet", data_dir=data_dir, split=split)
    return load_dataset(CIFAR10_HUB_ID, split=split)


def cifar10_rows(num_rows: int, data_dir: str | None = None):
    """The first ``num_rows`` CIFAR-10 training rows (columns img, label), with hf_clipsel's row_id."""
    from hf_clipsel.data import with_row_ids

    dataset = load_cifar10(data_dir, split="train")
    return with_row_ids(dataset.select(range(min(num_rows, len(dataset)))))
