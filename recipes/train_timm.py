"""Train a timm model on a selected subset under Accelerate; report top-1/top-5 on a test split.

The paper's downstream schedules are presets (`--schedule`); every value can be overridden by its flag.
`--batch_size` is the total batch over all processes, as in the paper.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/train_timm.py \
        --dataset outputs/cifar10 --dataset_config ratio_0.3 \
        --eval_dataset uoft-cs/cifar10 --eval_split test \
        --schedule cifar --output_dir outputs/cifar10/train_timm_ratio_0.3

A local copy of the test set in the Hub's parquet layout works too: `--eval_dataset parquet --eval_data_dir DIR`.
`--dataset` is anything `load_dataset` reads: a selection output dir or its Hub copy (with `--dataset_config
ratio_<r>`), a Hub id, or a builder such as `parquet` with `--data_dir`.
"""

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from datasets import ClassLabel, Image
from timm.data import create_transform, resolve_data_config
from tqdm.auto import tqdm
from training_common import PAPER_SCHEDULES, add_data_arguments, add_schedule_arguments, apply_schedule, load_split

from hf_clipsel.metrics import load_accuracy_metric

logger = get_logger(__name__)

# The paper's schedules, plus what timm needs: image_size None = the model's own, and the augmentation.
SMALL_IMAGES = dict(crop_pct=1.0, augment="pad_crop_flip")
SCHEDULES = {
    "cifar": {**PAPER_SCHEDULES["cifar"], "image_size": 32, **SMALL_IMAGES},
    "tiny_imagenet": {**PAPER_SCHEDULES["tiny_imagenet"], "image_size": 64, **SMALL_IMAGES},
    "imagenet": {**PAPER_SCHEDULES["imagenet"], "image_size": None, "crop_pct": None, "augment": "timm"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(p)
    p.add_argument("--model", default="resnet50", help="Any timm model name.")
    p.add_argument("--pretrained", action="store_true", help="Load timm's pretrained weights (needs the Hub).")
    add_schedule_arguments(p, SCHEDULES, extra=(("crop_pct", float),))
    p.add_argument(
        "--augment",
        choices=("pad_crop_flip", "timm"),
        default=None,
        help="Training augmentation. pad_crop_flip: random crop with padding of 1/8 of the image size and a "
        "horizontal flip, the usual CIFAR/Tiny-ImageNet one; timm: timm's training transform (RandomResizedCrop, "
        "colour jitter), made for ImageNet-sized images. Default: from --schedule.",
    )
    p.add_argument("--max_train_steps", type=int, default=None, help="Stop after this many optimizer steps.")
    p.add_argument("--eval_batch_size", type=int, default=None, help="Total; default: --batch_size.")
    p.add_argument("--top_k", type=int, nargs="+", default=[1, 5])
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resume_from_checkpoint", default=None, help="`latest` or a checkpoint directory.")
    p.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep the last N epochs; 0 keeps all.")
    return apply_schedule(p.parse_args(argv), SCHEDULES)


class ToModelInputs:
    """The `set_transform` function; a class, not a closure, so DataLoader workers can pickle it under spawn."""

    def __init__(self, transform, image_column, label_column):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column

    def __call__(self, batch):
        pixels = [self.transform(image.convert("RGB")) for image in batch[self.image_column]]
        return {"pixel_values": pixels, "labels": batch[self.label_column]}


def with_transform(dataset, transform, image_column, label_column):
    dataset.set_transform(ToModelInputs(transform, image_column, label_column), columns=[image_column, label_column])
    return dataset


def evaluate(model, loader, accelerator, metric, top_k):
    model.eval()
    logits, labels = [], []
    for batch in tqdm(loader, desc="eval", disable=not accelerator.is_local_main_process):
        with torch.no_grad():
            batch_logits = model(batch["pixel_values"])
        # gather_for_metrics drops the samples padded in to even out the last batch across processes.
        batch_logits, batch_labels = accelerator.gather_for_metrics((batch_logits, batch["labels"]))
        logits.append(batch_logits.float().cpu())
        labels.append(batch_labels.cpu())
    if not accelerator.is_main_process:
        return None
    return metric.compute(predictions=torch.cat(logits).numpy(), references=torch.cat(labels).numpy(), top_k=top_k)


def checkpoints(directory: Path):
    return sorted(directory.glob("epoch_*"), key=lambda path: int(path.name.split("_")[1]))


def training_transform(augment: str, data_config: dict):
    """The training augmentation; `pad_crop_flip` keeps the image size (small images lose too much to a resized
    crop) and normalises like the evaluation transform."""
    if augment == "timm":
        return create_transform(**data_config, is_training=True)
    from torchvision import transforms

    size = data_config["input_size"][-1]
    return transforms.Compose(
        [
            transforms.Resize(size),
            transforms.RandomCrop(size, padding=max(size // 8, 1)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(data_config["mean"], data_config["std"]),
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs start N processes that each run alone
    # unless told to use the CPU: then they form one gloo group.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(args.seed)
    output_dir, checkpoint_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"

    with accelerator.main_process_first():
        train = load_split(args.dataset, args.dataset_config, args.data_dir, args.split, args.max_train_samples)
        test = load_split(
            args.eval_dataset, args.eval_config, args.eval_data_dir, args.eval_split, args.max_eval_samples
        )
    image_column = args.image_column or next(k for k, v in train.features.items() if isinstance(v, Image))
    label_feature = train.features[args.label_column]
    if not isinstance(label_feature, ClassLabel):
        raise ValueError(f"`{args.label_column}` must be a ClassLabel column, got {label_feature}.")
    eval_feature = test.features[args.label_column]
    if isinstance(eval_feature, ClassLabel) and eval_feature.names != label_feature.names:
        raise ValueError("the train and eval label columns have different class names or order.")

    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=label_feature.num_classes)
    overrides = {"crop_pct": args.crop_pct} if args.crop_pct else {}
    if args.image_size:
        overrides["input_size"] = (3, args.image_size, args.image_size)
    data_config = resolve_data_config(overrides, model=model)
    with_transform(train, training_transform(args.augment, data_config), image_column, args.label_column)
    with_transform(test, create_transform(**data_config), image_column, args.label_column)

    if args.batch_size % accelerator.num_processes:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by {accelerator.num_processes} processes.")
    per_device = args.batch_size // accelerator.num_processes
    eval_per_device = max(1, (args.eval_batch_size or args.batch_size) // accelerator.num_processes)
    # drop_last as timm's own loader does: a last batch of one breaks BatchNorm on a 1x1 feature map.
    train_loader = torch.utils.data.DataLoader(
        train, batch_size=per_device, shuffle=True, drop_last=True, num_workers=args.num_workers
    )
    test_loader = torch.utils.data.DataLoader(test, batch_size=eval_per_device, num_workers=args.num_workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    # Stepped once per epoch by hand: a prepared scheduler would step once per process per call.
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=args.gamma)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    accelerator.register_for_checkpointing(scheduler)

    epochs = args.epochs
    if args.max_train_steps:
        epochs = min(epochs, math.ceil(args.max_train_steps / len(train_loader)))
    start_epoch, completed_steps = 0, 0
    if args.resume_from_checkpoint:
        found = checkpoints(checkpoint_dir)
        path = (
            (found[-1] if found else None)
            if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint)
        )
        if path is None:
            logger.info("No checkpoint in %s: starting from scratch.", checkpoint_dir)
        else:
            accelerator.load_state(str(path))
            progress = json.loads((path / "progress.json").read_text())
            start_epoch, completed_steps = progress["epoch"] + 1, progress["completed_steps"]
            logger.info("Resumed from %s at epoch %d, step %d.", path, start_epoch, completed_steps)

    logger.info(
        "%d training rows, %d test rows, %d epochs, %d steps per epoch, %d processes",
        len(train),
        len(test),
        epochs,
        len(train_loader),
        accelerator.num_processes,
    )
    for epoch in range(start_epoch, epochs):
        model.train()
        train_loader.set_epoch(epoch)  # the seedable sampler: the same order per epoch, resumed or not
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not accelerator.is_local_main_process)
        for batch in bar:
            loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            completed_steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2g}")
            if args.max_train_steps and completed_steps >= args.max_train_steps:
                break
        scheduler.step()
        accelerator.save_state(str(checkpoint_dir / f"epoch_{epoch}"))
        if accelerator.is_main_process:
            progress = {"epoch": epoch, "completed_steps": completed_steps}
            (checkpoint_dir / f"epoch_{epoch}" / "progress.json").write_text(json.dumps(progress))
            if args.checkpoints_total_limit:
                for old in checkpoints(checkpoint_dir)[: -args.checkpoints_total_limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        if args.max_train_steps and completed_steps >= args.max_train_steps:
            break

    metric = load_accuracy_metric(keep_in_memory=True) if accelerator.is_main_process else None
    results = evaluate(model, test_loader, accelerator, metric, args.top_k)
    if accelerator.is_main_process:
        summary = {
            **{key: value for key, value in results.items() if key != "accuracy"},
            "num_train_rows": len(train),
            "num_eval_rows": len(test),
            "epochs": epochs,
            "completed_steps": completed_steps,
            "num_processes": accelerator.num_processes,
            "elapsed_seconds": round(time.time() - started, 2),
            "args": vars(args),
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        logger.info("top-1 %.4f, metrics in %s", results.get("top1", float("nan")), output_dir / "metrics.json")
    accelerator.end_training()


if __name__ == "__main__":
    main()
