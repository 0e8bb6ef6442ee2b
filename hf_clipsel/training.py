"""Train the PEFT adapters on the target dataset (README.md, "The method", step 1).

Objective (a documented choice; the released code did not include its training): `class_ce`, the family's
pretraining loss (CLIP: softmax cross-entropy; SigLIP: sigmoid) of each image against all C class prompts with
logits = logit_scale * cos(f_i, g_c) + logit_bias, which avoids the false negatives that in-batch InfoNCE creates
between same-class images; `infonce`, in-batch symmetric InfoNCE, is offered as the alternative. Adam,
StepLR(x0.1 every `adapter_lr_step_epochs`), paper defaults.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from .configs import AdapterConfig
from .modeling import (
    class_text_features,
    clip_of,
    image_features,
    logit_bias,
    logit_scale,
    vision_tower_outputs,
)
from .models import family_of

logger = logging.getLogger(__name__)


def adapter_loss(
    features: torch.Tensor,
    class_features: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    objective: str,
    bias: float = 0.0,
    class_loss=F.cross_entropy,
) -> torch.Tensor:
    """``features`` [B, d] image features, ``class_features`` [C, d] normalised class features; ``class_loss``
    (logits, labels) -> loss is the family's (:meth:`~hf_clipsel.models.base.EncoderFamily.class_loss`)."""
    features = F.normalize(features, dim=-1)
    if objective == "class_ce":
        return class_loss(scale * features @ class_features.T + bias, labels)
    # In-batch symmetric InfoNCE: each image against the prompts of the batch's labels, and back.
    prompts = class_features[labels]
    logits = scale * features @ prompts.T
    targets = torch.arange(len(labels), device=labels.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _optimizer(model, config: AdapterConfig):
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the adapters have no trainable parameters; check adapter_preset.")
    optimizer = torch.optim.Adam(parameters, lr=config.adapter_learning_rate)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.adapter_lr_step_epochs, gamma=0.1)
    return optimizer, scheduler


@torch.no_grad()
def agrees_with_labels(
    model, vision_pooled: torch.Tensor, labels: torch.Tensor, text_pooled: torch.Tensor
) -> torch.Tensor:
    """``bool[N]``: whether each row's given label is the class the model prefers."""
    features = F.normalize(image_features(model, vision_pooled), dim=-1)
    predicted = (features @ class_text_features(model, text_pooled).T).argmax(dim=-1)
    return predicted.cpu() == labels.cpu()


def label_agreement(model, vision_pooled: torch.Tensor, labels: torch.Tensor, text_pooled: torch.Tensor) -> float:
    """Fraction of rows whose given label is the class the model prefers (in [0, 1]; higher = agrees more)."""
    if len(labels) == 0:
        return float("nan")
    return float(agrees_with_labels(model, vision_pooled, labels, text_pooled).float().mean())


def train_on_cache(
    peft_model,
    vision_pooled: torch.Tensor,
    labels: torch.Tensor,
    text_pooled: torch.Tensor,
    config: AdapterConfig,
    seed: int = 0,
    show_progress: bool = True,
    holdout: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[float]:
    """Train projection adapters on cached pooled outputs; returns the mean loss of each epoch.

    ``vision_pooled`` [N, hidden] and ``labels`` [N] hold only rows fit to train on; ``text_pooled`` is
    [T, C, hidden]. The towers are frozen in this preset, so no image or prompt is encoded again. With
    ``holdout`` (pooled outputs and labels of rows kept out of training), the adapters end at the epoch whose
    label agreement on those rows is highest (the earliest such epoch): the later epochs of a run on noisy labels
    mostly learn the noise.
    """
    device = peft_model.get_base_model().device
    optimizer, scheduler = _optimizer(peft_model, config)
    scale, bias, class_loss = (
        logit_scale(peft_model),
        logit_bias(peft_model),
        family_of(clip_of(peft_model)).class_loss,
    )
    generator = torch.Generator().manual_seed(seed)
    vision_pooled, labels, text_pooled = vision_pooled.to(device), labels.to(device), text_pooled.to(device)
    history = []
    best = None
    if holdout is not None:
        best = (label_agreement(peft_model, *holdout, text_pooled), _adapter_state(peft_model))
    peft_model.train()
    bar = tqdm(
        range(config.adapter_epochs), desc="Training adapters on the embedding cache", disable=not show_progress
    )
    for _ in bar:
        order = torch.randperm(len(labels), generator=generator).to(device)
        total = 0.0
        for start in range(0, len(order), config.adapter_batch_size):
            batch = order[start : start + config.adapter_batch_size]
            loss = adapter_loss(
                image_features(peft_model, vision_pooled[batch]),
                class_text_features(peft_model, text_pooled),
                labels[batch],
                scale,
                config.objective,
                bias,
                class_loss,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        scheduler.step()
        history.append(total / len(order))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if holdout is not None:
            peft_model.eval()
            agreement = label_agreement(peft_model, *holdout, text_pooled)
            if agreement > best[0]:
                best = (agreement, _adapter_state(peft_model))
            peft_model.train()
    peft_model.eval()
    if best is not None:
        peft_model.load_state_dict(best[1], strict=False)
    return history


def _adapter_state(peft_model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in peft_model.state_dict().items() if "lora_" in name}


class EndToEndObjective(torch.nn.Module):
    """The adapter loss as one module, so that a DistributedDataParallel wrapper sees the whole forward."""

    def __init__(self, peft_model, tokenizer, prompts: list[list[str]], objective: str):
        super().__init__()
        self.peft_model = peft_model
        self.shape = (len(prompts), len(prompts[0]))
        base = clip_of(peft_model)
        self.family = family_of(base)
        flat = [p for per_template in prompts for p in per_template]
        self.text_inputs = self.family.tokenize(tokenizer, flat, base.config)
        self.scale, self.bias = logit_scale(peft_model), logit_bias(peft_model)
        self.objective = objective

    def forward(self, image_inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """``image_inputs``: the image processor's output for the batch (the pixel values and whatever else the
        family's vision tower reads)."""
        # The text tower changes too: encode the prompts again at every step.
        base = self.peft_model.get_base_model()
        text_pooled = self.family.text_tower_outputs(base, self.text_inputs).reshape(*self.shape, -1)
        features = image_features(self.peft_model, vision_tower_outputs(self.peft_model, image_inputs))
        class_features = class_text_features(self.peft_model, text_pooled)
        return adapter_loss(
            features, class_features, labels, self.scale, self.objective, self.bias, self.family.class_loss
        )


def train_end_to_end(
    peft_model,
    image_batches,
    tokenizer,
    prompts: list[list[str]],
    config: AdapterConfig,
    accelerator: Accelerator,
) -> list[float]:
    """Train encoder LoRA adapters with full forwards (no cache is possible when the towers change).

    ``image_batches`` is a DataLoader of {"image_inputs", "labels"}; it and the objective are prepared by
    Accelerate, so several processes train with data parallelism.
    """
    objective = EndToEndObjective(peft_model, tokenizer, prompts, config.objective)
    optimizer, scheduler = _optimizer(objective, config)
    objective, optimizer, image_batches = accelerator.prepare(objective, optimizer, image_batches)
    history = []
    objective.train()
    bar = tqdm(
        range(config.adapter_epochs), desc="Training encoder adapters", disable=not accelerator.is_local_main_process
    )
    for _ in bar:
        total, count = 0.0, 0
        for batch in image_batches:
            loss = objective(batch["image_inputs"], batch["labels"])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            total += loss.item() * len(batch["labels"])
            count += len(batch["labels"])
        scheduler.step()
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    peft_model.eval()
    return history
