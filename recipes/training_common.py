"""What recipes/train_timm.py and recipes/train_trainer.py share: the paper's downstream schedules, the arguments
that name the data and the schedule, and loading a split. Both scripts import it from their own folder, which
Python puts on the path when it runs a script (also under `accelerate launch`)."""

from __future__ import annotations

import argparse

from datasets import load_dataset

# README.md, "The method" (downstream evaluation in the paper): SGD with momentum 0.9; lr multiplied by gamma at
# each milestone epoch. The ImageNet-1k decay epochs are not stated there: pass --milestones. Each script adds its
# own keys (image size for ImageNet, augmentation, ...).
PAPER_SCHEDULES = {
    "cifar": dict(lr=0.1, weight_decay=5e-4, batch_size=128, epochs=200, milestones=[60, 120, 160], gamma=0.2),
    "tiny_imagenet": dict(lr=0.1, weight_decay=1e-4, batch_size=256, epochs=90, milestones=[30, 60], gamma=0.1),
    "imagenet": dict(lr=0.01, weight_decay=1e-3, batch_size=256, epochs=105, milestones=[], gamma=0.1),
}


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="Training data: selection output dir, Hub id, or builder.")
    p.add_argument("--dataset_config", default=None, help="Config name, e.g. ratio_0.3.")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--eval_dataset", required=True, help="Test data, e.g. `parquet` with --eval_data_dir.")
    p.add_argument("--eval_config", default=None)
    p.add_argument("--eval_data_dir", default=None)
    p.add_argument("--eval_split", default="test")
    p.add_argument("--image_column", default=None, help="Default: the first Image column.")
    p.add_argument("--label_column", default="label")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)


def add_schedule_arguments(p: argparse.ArgumentParser, schedules: dict, extra: tuple = ()) -> None:
    """--schedule, and one flag per schedule value (``extra``: more (name, type) pairs) that overrides it."""
    p.add_argument("--schedule", choices=tuple(schedules), default="cifar")
    values = [("lr", float), ("weight_decay", float), ("batch_size", int), ("epochs", int), ("gamma", float)]
    for name, kind in [*values, ("image_size", int), *extra]:
        p.add_argument(f"--{name}", type=kind, default=None, help="Default: from --schedule.")
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="Epochs where lr *= gamma.")
    p.add_argument("--momentum", type=float, default=0.9)


def apply_schedule(args: argparse.Namespace, schedules: dict) -> argparse.Namespace:
    """Fill every value the command line left unset from the chosen schedule."""
    for key, value in schedules[args.schedule].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load_split(path, name, data_dir, split, max_samples):
    dataset = load_dataset(path, name, data_dir=data_dir, split=split)
    return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset
