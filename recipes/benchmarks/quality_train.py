"""Downstream training for the quality benchmark: one fixed timm model, one fixed budget, any subset.

Two trainers, chosen with bench_quality.py's --trainer:

- ``recipe``: recipes/train_timm.py itself (its ``main``, in this process), the code users run: timm's transforms,
  Accelerate, a checkpoint per epoch. Use it on a GPU.
- ``minimal`` (default on a CPU): the same model (``timm.create_model``), optimiser (SGD, momentum 0.9, lr 0.1,
  weight decay 5e-4, batch 128: train_timm's ``cifar`` schedule), loss, ``drop_last`` and evaluation (train_timm's
  normalisation constants and the package's accuracy metric module), in a loop without a DataLoader: the images are
  decoded once into a uint8 tensor and augmented per batch on tensors (4-pixel zero-padded random crop + flip, the
  usual CIFAR augmentation), and no checkpoint is written. On this 2-core machine train_timm's per-image PIL
  pipeline costs more than the model itself, and its per-epoch checkpoints more again (see the README).

Both use the same budget: ``steps`` optimiser steps for every subset (or ``epochs`` passes over it), with the lr
multiplied by ``gamma`` after 30%, 60% and 80% of the budget: the 60/120/160-of-200-epoch milestones of train_timm's
``cifar`` schedule, placed at the same fractions of a step budget.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from proxy_clip import random_crop_flip
from timm.data import resolve_data_config

from hf_clipsel.metrics import load_accuracy_metric

RECIPES = Path(__file__).resolve().parents[1]
MILESTONE_FRACTIONS = (0.3, 0.6, 0.8)  # train_timm's cifar schedule: epochs 60, 120, 160 of 200


@dataclass
class TrainSpec:
    model: str = "test_resnet"
    steps: int | None = 200  # fixed optimiser steps per subset, or...
    epochs: int | None = None  # ...fixed passes over the subset (then steps must be None)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 0.2

    def total_steps(self, num_rows: int) -> int:
        return self.steps if self.steps else self.epochs * (num_rows // self.batch_size)


def milestones(total: int) -> list[int]:
    return sorted({max(1, round(fraction * total)) for fraction in MILESTONE_FRACTIONS})


def normalization(model) -> tuple[torch.Tensor, torch.Tensor]:
    """train_timm's normalisation: timm's data config of the model at 32x32, crop_pct 1.0."""
    config = resolve_data_config({"crop_pct": 1.0, "input_size": (3, 32, 32)}, model=model)
    return torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)


def train_minimal(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    spec: TrainSpec,
    seed: int,
    num_classes: int = 10,
) -> dict:
    """Train from scratch on uint8 ``images`` [n, 3, 32, 32] with ``labels``; top-1 on the test tensors."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = timm.create_model(spec.model, num_classes=num_classes)
    mean, std = normalization(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    total = spec.total_steps(len(labels))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones(total), gamma=spec.gamma)
    per_epoch = len(labels) // spec.batch_size  # drop_last, as train_timm
    if per_epoch == 0:
        raise ValueError(f"{len(labels)} rows is less than one batch of {spec.batch_size}.")
    model.train()
    step, losses = 0, []
    while step < total:
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, per_epoch * spec.batch_size, spec.batch_size):
            batch = order[start : start + spec.batch_size]
            pixels = (random_crop_flip(images[batch], generator) / 255.0 - mean) / std
            loss = F.cross_entropy(model(pixels), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
    train_seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model((test_images[i : i + 500].float() / 255.0 - mean) / std) for i in range(0, len(test_labels), 500)]
        )
    metric = load_accuracy_metric(keep_in_memory=True)
    result = metric.compute(predictions=logits.numpy(), references=test_labels.numpy(), top_k=[1])
    return {
        "top1": float(result["top1"]),
        "num_train_rows": len(labels),
        "steps": step,
        "epochs": round(step / per_epoch, 2),
        "final_train_loss": round(float(np.mean(losses[-20:])), 4),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "trainer": "minimal",
    }


def train_recipe(
    dataset: str,
    dataset_config: str | None,
    data_dir: str | None,
    eval_data_dir: str,
    num_rows: int,
    spec: TrainSpec,
    seed: int,
    output_dir: Path,
) -> dict:
    """recipes/train_timm.py's main on ``dataset`` (a selection output folder with ``dataset_config`` ratio_<r>, or
    ``parquet`` with ``data_dir``), evaluated on the parquet ``test`` split in ``eval_data_dir``. Same budget as the
    minimal trainer, in whole epochs: ceil(steps / steps per epoch) epochs, stopped at ``steps`` (max_train_steps)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    import train_timm

    per_epoch = num_rows // spec.batch_size
    epochs = spec.epochs or math.ceil(spec.steps / per_epoch)
    argv = ["--eval_dataset", "parquet", "--eval_data_dir", eval_data_dir, "--eval_split", "test"]
    argv += ["--dataset", dataset] + (["--dataset_config", dataset_config] if dataset_config else [])
    argv += ["--data_dir", data_dir] if data_dir else []
    argv += [
        "--model",
        spec.model,
        "--schedule",
        "cifar",
        "--epochs",
        str(epochs),
        "--batch_size",
        str(spec.batch_size),
    ]
    argv += ["--lr", str(spec.lr), "--weight_decay", str(spec.weight_decay), "--gamma", str(spec.gamma)]
    argv += ["--milestones", *map(str, milestones(epochs)), "--top_k", "1", "--num_workers", "0"]
    argv += ["--seed", str(seed), "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"]
    if spec.steps:
        argv += ["--max_train_steps", str(spec.steps)]
    train_timm.main(argv)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return {
        "top1": float(metrics["top1"]),
        "num_train_rows": metrics["num_train_rows"],
        "steps": metrics["completed_steps"],
        "epochs": metrics["epochs"],
        "seconds": metrics["elapsed_seconds"],
        "trainer": "recipe",
    }
