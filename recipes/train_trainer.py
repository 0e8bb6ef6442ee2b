"""Train a transformers image classifier on a selected subset with Trainer; report top-1/top-5 on a test split.

Without `--model_name_or_path` the model is built from a config (a small ViT or ConvNeXt, random weights, no
Hub access); with it, a pretrained checkpoint is fine-tuned. The paper's schedules are presets (`--schedule`,
SGD + MultiStepLR), overridable by flags; `--optim adamw_torch` switches to Trainer's own optimizer and
`--lr_scheduler_type`. `--batch_size` is the total batch over all processes, as in the paper.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/train_trainer.py \
        --dataset outputs/cifar10 --dataset_config ratio_0.3 \
        --eval_dataset uoft-cs/cifar10 --eval_split test \
        --schedule cifar --output_dir outputs/cifar10/train_trainer_ratio_0.3

A local copy of the test set in the Hub's parquet layout works too: `--eval_dataset parquet --eval_data_dir DIR`.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from datasets import ClassLabel, Image
from torchvision import transforms
from training_common import PAPER_SCHEDULES, add_data_arguments, add_schedule_arguments, apply_schedule, load_split
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ConvNextConfig,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTImageProcessor,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.trainer_utils import get_last_checkpoint

from hf_clipsel.metrics import load_accuracy_metric

# The paper's schedules (recipes/training_common.py); milestones in epochs; ImageNet at 224 pixels.
SCHEDULES = {
    "cifar": {**PAPER_SCHEDULES["cifar"], "image_size": 32},
    "tiny_imagenet": {**PAPER_SCHEDULES["tiny_imagenet"], "image_size": 64},
    "imagenet": {**PAPER_SCHEDULES["imagenet"], "image_size": 224},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(p)
    p.add_argument("--model_name_or_path", default=None, help="Pretrained checkpoint; default: build from config.")
    p.add_argument("--model_type", choices=("vit", "convnext"), default="vit", help="Architecture built from config.")
    p.add_argument("--config_overrides", default=None, help="e.g. `hidden_size=64,num_hidden_layers=2`.")
    add_schedule_arguments(p, SCHEDULES)
    p.add_argument("--optim", default=None, help="A Trainer optimizer name; default: the paper's SGD + MultiStepLR.")
    p.add_argument("--lr_scheduler_type", default="linear", help="Trainer's scheduler, used with --optim only.")
    p.add_argument("--max_train_steps", type=int, default=None, help="Stop after this many optimizer steps.")
    p.add_argument("--eval_batch_size", type=int, default=None, help="Total; default: --batch_size.")
    p.add_argument("--eval_strategy", choices=("no", "epoch"), default="no", help="The final evaluation always runs.")
    p.add_argument("--top_k", type=int, nargs="+", default=[1, 5])
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--use_cpu", action="store_true", help="Train on the CPU even when a GPU is present.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resume_from_checkpoint", default=None, help="`latest` or a checkpoint directory.")
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    return apply_schedule(p.parse_args(argv), SCHEDULES)


def build_model(args, labels: ClassLabel):
    label_maps = dict(
        num_labels=labels.num_classes,
        id2label=dict(enumerate(labels.names)),
        label2id={name: i for i, name in enumerate(labels.names)},
    )
    if args.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path, ignore_mismatched_sizes=True, **label_maps
        )
        return model, AutoImageProcessor.from_pretrained(args.model_name_or_path)
    size = args.image_size
    if args.model_type == "vit":  # a ViT-Tiny width at half depth, on an 8x8 grid of patches
        config = ViTConfig(
            image_size=size,
            patch_size=max(2, size // 8),
            hidden_size=192,
            num_hidden_layers=6,
            num_attention_heads=3,
            intermediate_size=768,
            **label_maps,
        )
    else:  # ConvNeXt-Atto-like widths and depths
        config = ConvNextConfig(image_size=size, depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], **label_maps)
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    model = AutoModelForImageClassification.from_config(config)
    processor = ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD
    )
    return model, processor


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


def collate(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world_size:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by {world_size} processes.")
    output_dir = Path(args.output_dir)

    train = load_split(args.dataset, args.dataset_config, args.data_dir, args.split, args.max_train_samples)
    test = load_split(args.eval_dataset, args.eval_config, args.eval_data_dir, args.eval_split, args.max_eval_samples)
    image_column = args.image_column or next(k for k, v in train.features.items() if isinstance(v, Image))
    labels = train.features[args.label_column]
    if not isinstance(labels, ClassLabel):
        raise ValueError(f"`{args.label_column}` must be a ClassLabel column, got {labels}.")
    eval_labels = test.features[args.label_column]
    if isinstance(eval_labels, ClassLabel) and eval_labels.names != labels.names:
        raise ValueError("the train and eval label columns have different class names or order.")

    model, processor = build_model(args, labels)
    size = processor.size.get("height") or processor.size.get("shortest_edge") or args.image_size
    normalize = transforms.Normalize(mean=processor.image_mean, std=processor.image_std)
    train_transform = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.RandomCrop(size, padding=size // 8, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_transform = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), normalize]
    )
    with_transform(train, train_transform, image_column, args.label_column)
    with_transform(test, eval_transform, image_column, args.label_column)

    training_args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=args.batch_size // world_size,
        per_device_eval_batch_size=max(1, (args.eval_batch_size or args.batch_size) // world_size),
        num_train_epochs=args.epochs,
        max_steps=args.max_train_steps or -1,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        optim=args.optim or "adamw_torch",
        lr_scheduler_type=args.lr_scheduler_type,
        eval_strategy=args.eval_strategy,
        save_strategy="epoch",
        save_total_limit=args.checkpoints_total_limit or None,
        logging_steps=10,
        remove_unused_columns=False,  # the transform needs the image column, which forward() does not name
        dataloader_num_workers=args.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Several processes on a machine without GPUs each run alone unless told to use the CPU.
        use_cpu=args.use_cpu or (world_size > 1 and not torch.cuda.is_available()),
        report_to="none",
        seed=args.seed,
    )
    optimizers = (None, None)
    if args.optim is None:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        # Trainer steps the scheduler once per optimizer step: epochs -> steps.
        steps_per_epoch = math.ceil(len(train) / args.batch_size)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[m * steps_per_epoch for m in args.milestones], gamma=args.gamma
        )
        optimizers = (optimizer, scheduler)

    with training_args.main_process_first(desc="loading the metric"):  # evaluate copies it without a file lock
        metric = load_accuracy_metric(keep_in_memory=True)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=logits, references=prediction.label_ids, top_k=args.top_k)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        data_collator=collate,
        compute_metrics=compute_metrics,
        optimizers=optimizers,
        processing_class=processor,
    )
    resume = args.resume_from_checkpoint
    if resume == "latest":
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        resume = last  # None: no checkpoint yet, start from scratch
    train_result = trainer.train(resume_from_checkpoint=resume)
    results = trainer.evaluate()
    trainer.save_model(str(output_dir / "model"))
    if trainer.is_world_process_zero():
        summary = {
            **{key[len("eval_") :]: value for key, value in results.items() if key.startswith("eval_top")},
            "num_train_rows": len(train),
            "num_eval_rows": len(test),
            "epochs": trainer.state.epoch,
            "completed_steps": trainer.state.global_step,
            "train_loss": train_result.training_loss,
            "num_processes": training_args.world_size,
            "elapsed_seconds": round(time.time() - started, 2),
            "args": vars(args),
        }
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: summary[k] for k in summary if k.startswith("top")}))


if __name__ == "__main__":
    main()
