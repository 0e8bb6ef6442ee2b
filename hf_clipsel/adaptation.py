"""Module 1 as a stage: train, load or check the adapters that scoring uses."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Image

from .context import RunContext, prompts_of, valid_rows
from .data import ROW_ID, decode_rgb
from .embedding import embed_class_prompts, embed_stage, pooled_matrix
from .modeling import attach_adapters, load_adapters, uses_encoder_adapters
from .outputs import ADAPTER_DIR, write_atomic_text
from .preprocessing import resize_target
from .training import agrees_with_labels, train_end_to_end, train_on_cache

logger = logging.getLogger(__name__)

ADAPTER_CHECK = "clipsel_adapter_check.json"  # beside the adapters: the held-out agreement check's verdict


def adapter_fingerprint(peft_model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(peft_model.state_dict().items()):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapt_stage(context: RunContext, embeddings: Dataset, directory: Path | None = None):
    """The model scores are computed with: zero-shot CLIP, loaded adapters, or adapters trained here (saved to
    ``directory/adapter``, a run folder's staging area; default output_dir)."""
    adapter = context.config.adapter
    if adapter.adapter_path:
        return load_adapters(context.model, adapter.adapter_path)
    if not adapter.preset_traits.adapts:
        return context.model
    torch.manual_seed(context.config.selection.seed)
    peft_model = attach_adapters(context.model, adapter)
    valid = valid_rows(context, embeddings)
    labels = torch.from_numpy(context.source.labels)
    check = None
    if adapter.preset_traits.on_cache:
        if context.accelerator.is_main_process:
            text_pooled = embed_class_prompts(peft_model, context.processor.tokenizer, prompts_of(context))
            pooled = pooled_matrix(embeddings)
            seed = context.config.selection.seed
            train, validation, held = split_holdout(np.nonzero(valid)[0], adapter.adapter_holdout_fraction, seed)
            early_stopping = (pooled[validation], labels[validation]) if len(validation) else None
            zero_shot = agrees_with_labels(peft_model, pooled[held], labels[held], text_pooled)
            train_on_cache(
                peft_model, pooled[train], labels[train], text_pooled, adapter, seed, holdout=early_stopping
            )
            if len(held):
                adapted = agrees_with_labels(peft_model, pooled[held], labels[held], text_pooled)
                check = agreement_check(zero_shot.numpy(), adapted.numpy(), adapter.adapter_check_confidence)
                # Early stopping may keep the starting point (LoRA B = 0): then nothing was adapted; say so.
                check["adapters_changed"] = any(
                    bool(t.abs().sum()) for n, t in peft_model.state_dict().items() if "lora_B" in n
                )
                if not check["adapters_changed"]:
                    logger.warning(
                        "No epoch agreed better with the held-out labels than zero-shot CLIP: the adapters "
                        "stay at their starting point and the scores are zero-shot."
                    )
                if check["fell_back"]:
                    peft_model.base_model.disable_adapter_layers()
    else:
        train_end_to_end(
            peft_model,
            image_loader(context, np.nonzero(valid)[0]),
            context.processor.tokenizer,
            prompts_of(context),
            adapter,
            context.accelerator,
        )
    if context.accelerator.is_main_process:
        adapter_dir = Path(directory or context.output_dir) / ADAPTER_DIR
        shutil.rmtree(adapter_dir, ignore_errors=True)  # never write into files linked from a finished run
        peft_model.save_pretrained(str(adapter_dir))
        if check is not None:
            write_atomic_text(adapter_dir / ADAPTER_CHECK, json.dumps(check, indent=2))
    context.accelerator.wait_for_everyone()
    return peft_model


def split_holdout(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, early-stopping, check) rows: ``fraction`` of ``rows`` held out, split in two halves. The check half
    judges the adapters after early stopping has picked its epoch on the other half, so the check stays honest."""
    held = round(fraction * len(rows))
    if held < 2:
        return rows, rows[:0], rows[:0]
    order = np.random.default_rng(seed).permutation(rows)
    validation, check = np.sort(order[: held // 2]), np.sort(order[held // 2 : held])
    return np.sort(order[held:]), validation, check


def sign_test_p_value(only_adapted_right: int, only_zero_shot_right: int) -> float:
    """One-sided sign test: P(X >= only_adapted_right) for X ~ Binomial(n, 1/2), n = the rows where exactly one of
    the two models agrees with the label. Small means the adapters' gain is unlikely to be chance."""
    from scipy.stats import binomtest

    n = only_adapted_right + only_zero_shot_right
    if n == 0:
        return 1.0
    return float(binomtest(only_adapted_right, n, 0.5, alternative="greater").pvalue)


def agreement_check(zero_shot_agrees: np.ndarray, adapted_agrees: np.ndarray, confidence: float) -> dict:
    """The safety check users see, on held-out rows: keep the adapters only if they agree with the given labels
    more often than zero-shot CLIP, significantly at ``confidence`` (0: unless they agree less). Otherwise the
    scores use zero-shot features: adapters that agree less have learned the labels' noise more than the data,
    and a gain within chance is no reason to trust them over zero-shot CLIP (adapters that learned structured
    noise gain a little on held-out rows with the same noise)."""
    zero_shot_agrees, adapted_agrees = np.asarray(zero_shot_agrees, bool), np.asarray(adapted_agrees, bool)
    rows = len(zero_shot_agrees)
    zero_shot, adapted = float(zero_shot_agrees.mean()), float(adapted_agrees.mean())
    only_adapted = int((adapted_agrees & ~zero_shot_agrees).sum())
    only_zero_shot = int((zero_shot_agrees & ~adapted_agrees).sum())
    p_value = sign_test_p_value(only_adapted, only_zero_shot)
    if confidence == 0:
        fell_back = adapted < zero_shot
    else:
        fell_back = only_adapted <= only_zero_shot or p_value > 1 - confidence
    if fell_back and adapted < zero_shot:
        logger.warning(
            "The adapted model agrees with the given labels less than zero-shot CLIP on %d held-out rows "
            "(%.3f vs %.3f): the labels are likely noisy. Falling back to zero-shot features for scoring.",
            rows,
            adapted,
            zero_shot,
        )
    elif fell_back and only_adapted > only_zero_shot:
        logger.warning(
            "The adapted model agrees with the given labels on %d held-out rows where zero-shot CLIP does not, and "
            "zero-shot on %d where it does not (%.3f vs %.3f): a gain this small is within chance (sign test p = "
            "%.2f > %.2f), and adapters that learned structured label noise look like this. Falling back to "
            "zero-shot features for scoring.",
            only_adapted,
            only_zero_shot,
            adapted,
            zero_shot,
            p_value,
            1 - confidence,
        )
    else:
        logger.info(
            "Adapter check on %d held-out rows: label agreement %.3f (zero-shot %.3f), sign test p = %.3g; %s.",
            rows,
            adapted,
            zero_shot,
            p_value,
            "scoring with zero-shot features" if fell_back else "adapters kept",
        )
    return {
        "held_out_rows": rows,
        "zero_shot_agreement": zero_shot,
        "adapted_agreement": adapted,
        "rows_only_adapted_agrees": only_adapted,
        "rows_only_zero_shot_agrees": only_zero_shot,
        "sign_test_p_value": p_value,
        "confidence": confidence,
        "fell_back": fell_back,
    }


def read_adapter_check(adapter_dir: Path) -> dict | None:
    path = Path(adapter_dir) / ADAPTER_CHECK
    return json.loads(path.read_text()) if path.exists() else None


def image_loader(context: RunContext, rows: np.ndarray):
    """Batches of the image processor's outputs and labels for end-to-end training (rows known to decode)."""
    image_column = context.source.image_column
    subset = context.dataset.select(rows.tolist()).select_columns([ROW_ID, image_column])
    subset = subset.cast_column(image_column, Image(decode=False))
    processor = context.processor.image_processor
    labels = context.source.labels
    # Decoded as the embed stage decodes them, so that the adapters train on the pixels they are scored on.
    draft_size = resize_target(processor) if context.config.run.jpeg_draft else None

    def collate(batch):
        images = [decode_rgb(row[image_column], draft_size)[0] for row in batch]
        return {
            "image_inputs": dict(processor(images=images, return_tensors="pt")),
            "labels": torch.tensor([labels[row[ROW_ID]] for row in batch]),
        }

    generator = torch.Generator().manual_seed(context.config.selection.seed)
    return torch.utils.data.DataLoader(
        subset,
        batch_size=context.config.adapter.adapter_batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=generator,
    )


def scoring_embeddings(context: RunContext, model, embeddings: Dataset) -> Dataset:
    """Encoder adapters change the vision tower's outputs: embed again through it (every process)."""
    if model is not context.model and uses_encoder_adapters(model):
        return embed_stage(context, model, f"{context.model_fingerprint}-{adapter_fingerprint(model)}")
    return embeddings


def trained_model(context: RunContext):
    """The model the score stage uses: given adapters, this run's saved adapters, or zero-shot CLIP."""
    adapter = context.config.adapter
    saved = context.output_dir / ADAPTER_DIR
    if adapter.adapter_path:
        return load_adapters(context.model, adapter.adapter_path)
    if not adapter.preset_traits.adapts:
        return context.model
    if not saved.exists():
        raise FileNotFoundError(
            f"no adapters in {saved}; run `hf-clipsel adapt` first, or pass --adapter_path, or "
            "--adapter_preset none for zero-shot scores."
        )
    model = load_adapters(context.model, str(saved))
    if (read_adapter_check(saved) or {}).get("fell_back"):  # the adapt stage judged them worse than zero-shot
        model.base_model.disable_adapter_layers()
    return model
