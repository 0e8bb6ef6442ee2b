"""Dataset and adapter cards, rendered from the Jinja templates in ``model_cards/`` (shipped as
``hf_clipsel/templates``) with huggingface_hub's :class:`DatasetCard` / :class:`ModelCard`.

Everything a card says is read back from what the run wrote in ``output_dir``: ``run_config.yaml`` (the resolved
flat configuration, ``versions`` and ``command``), ``run_summary.json`` (``budget`` per ratio), ``scores/`` (counts,
per-class counts and score quantiles are computed from it, so the card cannot disagree with the data) and the
``subsets/ratio_*`` directories present (one ``configs:`` entry each, so ``load_dataset(output_dir, "ratio_0.3")``
works locally and on the Hub). No token is ever rendered: values under keys that mention a token are dropped and
the text is scrubbed of anything shaped like a Hugging Face token before it is returned.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import yaml
from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData, constants

from .configs import ADAPTER_PRESETS, budget, flag_classes
from .core.names import reward_column, selected_column
from .duplicates import THUMBNAIL_SIMILARITY
from .hub_access import is_hub_repo_id
from .outputs import (
    ADAPTER_DIR,
    REPORT_DIR,
    REPORT_FIGURES,
    RUN_CONFIG,
    SUBSETS_DIR,
    dataset_configs,
    ratio_name,
)
from .reasons import reason_order
from .scores import drop_reason_order, score_columns
from .summary import RunSummary

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
DATASET_CARD_TEMPLATE = "dataset_card.md"
ADAPTER_CARD_TEMPLATE = "adapter_card.md"
QUANTILES = (("min", 0.0), ("5%", 0.05), ("25%", 0.25), ("median", 0.5), ("75%", 0.75), ("95%", 0.95), ("max", 1.0))
SIZE_CATEGORIES = (
    (1e3, "n<1K"),
    (1e4, "1K<n<10K"),
    (1e5, "10K<n<100K"),
    (1e6, "100K<n<1M"),
    (1e7, "1M<n<10M"),
    (1e8, "10M<n<100M"),
    (1e9, "100M<n<1B"),
)
CITATION = """@inproceedings{yang2025clipselection,
  title         = {A {CLIP}-Powered Framework for Robust and Generalizable Data Selection},
  author        = {Yang, Suorong and Ye, Peng and Ouyang, Wanli and Zhou, Dongzhan and Shen, Furao},
  booktitle     = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year          = {2025},
  eprint        = {2410.11215},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2410.11215}
}"""
TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
TRAINING_KEYS = (
    "adapter_preset",
    "adapter_path",
    "objective",
    "adapter_epochs",
    "adapter_learning_rate",
    "adapter_lr_step_epochs",
    "adapter_batch_size",
    "lora_dropout",
    "prompt_templates",
    "seed",
)


def redact(text: str, *secrets: str | None) -> str:
    """``text`` without ``secrets``, the ``HF_TOKEN`` of the environment, or anything shaped like an HF token."""
    for secret in (*secrets, os.environ.get("HF_TOKEN")):
        if secret and len(secret) >= 8:
            text = text.replace(secret, "<redacted>")
    return TOKEN_PATTERN.sub("<redacted>", text)


def _link(name: str | None, repo_type: str = "model") -> str:
    if not name:
        return "`unknown`"
    if not is_hub_repo_id(name):
        # a pushed card names it by its file or folder name only (hf_clipsel.publish), the local card by its path
        return f"`{name}` (local files, not on the Hub)"
    prefix = "" if repo_type == "model" else "datasets/"
    return f"[{name}]({constants.ENDPOINT}/{prefix}{name})"


def _revision(name: str, revision: str | None) -> str:
    if not is_hub_repo_id(name):
        return "none (local files)"
    return revision or "not pinned (the default branch at run time)"


def _render(template: str, **context) -> str:
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # markdown, not HTML
    )
    return environment.get_template(template).render(**context)


def read_run(output_dir: str | Path) -> tuple[dict, RunSummary]:
    """``run_config.yaml`` (an empty mapping where it is missing) and the run summary of a run."""
    output_dir = Path(output_dir)
    config = yaml.safe_load((output_dir / RUN_CONFIG).read_text()) if (output_dir / RUN_CONFIG).exists() else {}
    return config or {}, RunSummary.read(output_dir)


def subset_ratios(output_dir: str | Path) -> list[float]:
    """Selection ratios with a ``subsets/ratio_<r>/`` directory holding parquet files, ascending."""
    ratios = []
    for directory in (Path(output_dir) / SUBSETS_DIR).glob("ratio_*"):
        try:
            ratio = float(directory.name.removeprefix("ratio_"))
        except ValueError:
            continue
        if ratio_name(ratio) == directory.name and any(directory.glob("*.parquet")):
            ratios.append(ratio)
    return sorted(ratios)


def card_configs(output_dir: str | Path) -> list[dict]:
    """The YAML ``configs:`` of the dataset card: one per subset directory, and ``scores``."""
    return dataset_configs(output_dir, subset_ratios(output_dir))


def _read_scores(output_dir: Path):
    """The scores table (pyarrow) of the run written in ``output_dir`` and its class names; (None, None) without."""
    from datasets import ClassLabel

    from .scores_table import read_scores_in

    try:
        scores = read_scores_in(output_dir)
    except FileNotFoundError:
        return None, None
    label = scores.features.get("label")
    return scores.data.table, (label.names if isinstance(label, ClassLabel) else None)


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _cell(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _parameter_groups(config: dict) -> list[dict]:
    groups, seen = [], {"versions", "command"}
    for klass in flag_classes():
        rows = []
        for f in fields(klass):
            if f.name in config and "token" not in f.name:
                rows.append({"key": f.name, "value": _cell(config[f.name]), "help": _cell(f.metadata.get("help", ""))})
                seen.add(f.name)
        if rows:
            name = klass.__name__.removesuffix("Config").removesuffix("Options") or klass.__name__
            groups.append({"name": name, "rows": rows})
    other = [
        {"key": k, "value": _cell(v), "help": ""} for k, v in config.items() if k not in seen and "token" not in k
    ]
    if other:
        groups.append({"name": "Other", "rows": other})
    return groups


def _adapter_description(config: dict, output_dir: Path, model_repo_id: str | None, check: dict | None) -> str:
    preset = config.get("adapter_preset", "projection")
    if config.get("adapter_path"):
        return f"given, loaded from {_link(config['adapter_path'])}"
    if not ADAPTER_PRESETS[preset].adapts:
        return f"{preset}: zero-shot CLIP"
    peft = _peft_summary(output_dir)
    where = (
        f"; in {_link(model_repo_id)}" if model_repo_id else " (`adapter/` of the run, not part of this repository)"
    )
    if (check or {}).get("fell_back"):
        return (
            f"`{preset}` preset trained, then set aside: on held-out rows the adapters agreed with the labels no "
            f"better than zero-shot, so the scores are zero-shot ({peft}{where})"
        )
    return f"`{preset}` preset: {peft}{where}"


def _peft_summary(output_dir: Path) -> str:
    path = output_dir / ADAPTER_DIR / "adapter_config.json"
    if not path.exists():
        return "PEFT adapters"
    peft = json.loads(path.read_text())
    targets = peft.get("target_modules") or []
    targets = ", ".join(f"`{t}`" for t in (sorted(targets) if isinstance(targets, list) else [targets]))
    kind = peft.get("peft_type", "LORA")
    return f"{kind} (rank {peft.get('r')}, alpha {peft.get('lora_alpha')}) on {targets}"


def render_dataset_card(
    output_dir: str | Path,
    dataset_repo_id: str | None = None,
    model_repo_id: str | None = None,
    location: str | Path | None = None,
) -> DatasetCard:
    """The dataset card of the run written in ``output_dir``.

    ``dataset_repo_id`` is what the ``load_dataset`` snippets name; without it, ``location``: the folder the run is
    read from (a run is rendered in its staging folder, which is gone once committed), else ``output_dir``.
    ``model_repo_id`` is linked as the home of the adapters.
    """
    output_dir = Path(output_dir)
    config, summary = read_run(output_dir)
    ratios = subset_ratios(output_dir)
    table, label_names = _read_scores(output_dir)
    class_names = label_names or summary.class_names

    source_name = config.get("dataset_name") or (config.get("source") or {}).get("description") or summary.dataset
    source_name = source_name or "unknown"
    model_name = config.get("model_name_or_path") or summary.model or "unknown"
    num_rows = table.num_rows if table is not None else summary.num_rows
    labels = valid = None
    if table is not None:
        labels = table.column("label").to_numpy(zero_copy_only=False) if "label" in table.column_names else None
        if "flag_reason" in table.column_names:
            valid = np.asarray(table.column("flag_reason").to_pylist()) == ""
        elif "decode_ok" in table.column_names:
            valid = table.column("decode_ok").to_numpy(zero_copy_only=False).astype(bool)
        else:
            valid = np.ones(num_rows, dtype=bool)
    num_valid = int(valid.sum()) if valid is not None else summary.num_valid

    def column(name):
        return (
            table.column(name).to_numpy(zero_copy_only=False)
            if table is not None and name in table.column_names
            else None
        )

    ratio_rows, kept_masks = [], []
    alignment, diversity = column("semantic_alignment"), column("sample_diversity")
    for ratio in ratios:
        mask = column(selected_column(ratio))
        mask = mask.astype(bool) if mask is not None else None
        kept_masks.append(mask)
        info = summary.ratios.get(f"{ratio:g}")
        kept = int(mask.sum()) if mask is not None else (info.kept if info else "n/a")
        k = info.budget if info else budget(ratio, num_rows)
        ratio_rows.append(
            {
                "config": ratio_name(ratio),
                "ratio": f"{ratio:g}",
                "slug": f"{ratio:g}".replace(".", "_"),
                "budget": k,
                "kept": kept,
                "shortfall": k - kept if isinstance(kept, int) else "n/a",
                "percent": f"{100 * kept / num_rows:.1f}%" if isinstance(kept, int) and num_rows else "n/a",
                "mean_alignment": _fmt(float(alignment[mask].mean()))
                if mask is not None and mask.any() and alignment is not None
                else "n/a",
                "mean_diversity": _fmt(float(diversity[mask].mean()))
                if mask is not None and mask.any() and diversity is not None
                else "n/a",
            }
        )

    classes = []
    for index, name in enumerate(class_names):
        if labels is not None:
            in_class = labels == index
            total = int(in_class.sum())
            kept = [int((m & in_class).sum()) if m is not None else "n/a" for m in kept_masks]
        else:
            total = summary.rows_per_class.get(name, "n/a")
            kept = [
                summary.ratios[f"{r:g}"].kept_per_class.get(name, "n/a") if f"{r:g}" in summary.ratios else "n/a"
                for r in ratios
            ]
        classes.append({"name": _cell(name), "total": total, "kept": kept})

    quantiles = []
    # quantiles of the float scores (an int column holds row ids: its quantiles say nothing)
    for name in [*(c.name for c in score_columns() if c.dtype == "float32"), *[reward_column(r) for r in ratios]]:
        values = column(name)
        if values is None:
            continue
        values = values.astype(np.float64)[valid] if valid is not None else values.astype(np.float64)
        values = values[np.isfinite(values)]
        row = [_fmt(float(np.quantile(values, q))) if values.size else "n/a" for _, q in QUANTILES]
        quantiles.append({"column": name, "cells": [*row, _fmt(float(values.mean())) if values.size else "n/a"]})

    plots = [
        {"path": p.relative_to(output_dir).as_posix(), "title": p.stem.replace("_", " ")}
        for p in (output_dir / REPORT_DIR / name for name in REPORT_FIGURES)
        if p.exists()
    ]
    size_category = next((label for limit, label in SIZE_CATEGORIES if num_rows < limit), "n>1B")
    card_data = DatasetCardData(
        pretty_name=f"{source_name} selected with hf-clipsel",
        task_categories=["image-classification"],
        size_categories=[size_category],
        source_datasets=[source_name] if is_hub_repo_id(source_name) else None,
        tags=["hf-clipsel", "data-selection", "clip"],
        configs=card_configs(output_dir),
    )
    command = config.get("command")
    if isinstance(command, list):
        command = " ".join(command)
    versions = config.get("versions") or {}
    content = _render(
        DATASET_CARD_TEMPLATE,
        card_data=card_data.to_yaml(),
        title=f"{source_name}: CLIP-selected subsets",
        load_target=dataset_repo_id or str(location or output_dir),
        source={
            "name": source_name,
            "link": _link(source_name, "dataset"),
            "config": config.get("dataset_config_name"),
            "split": config.get("dataset_split", "train"),
            "revision": _revision(source_name, summary.dataset_revision or config.get("dataset_revision")),
        },
        model={
            "name": model_name,
            "link": _link(model_name),
            "revision": _revision(model_name, summary.model_revision or config.get("model_revision")),
        },
        adapter={
            "preset": config.get("adapter_preset", "projection"),
            # the held-out check can judge the adapters worse than zero-shot: the scores are then zero-shot's
            "adapted": config.get("adapter_preset", "projection") != "none"
            and not (summary.adapter_check or {}).get("fell_back"),
            "description": _adapter_description(config, output_dir, model_repo_id, summary.adapter_check),
        },
        method={
            "selection_method": config.get("selection_method", summary.selection_method or "exact"),
            "alpha": "= selection ratio" if config.get("alpha", 0.1) is None else config.get("alpha", 0.1),
            "beta": config.get("beta", 2.0),
            "knn_k": config.get("knn_k", "K"),
            "class_balanced": config.get("class_balanced", False),
            # defaults of runs written before these settings existed: the paper's reward
            "alignment": config.get("alignment", "sas"),
            "gated": config.get("diversity_gate", "none") == "agreement",
            "damage_check": config.get("damage_check", False),
            "duplicate_check": config.get("duplicate_check", False),
        },
        counts={"num_rows": num_rows, "num_valid": num_valid, "num_flagged": num_rows - num_valid},
        ratios=ratio_rows,
        classes=classes,
        quantile_names=[name for name, _ in QUANTILES] + ["mean"],
        quantiles=quantiles,
        score_meanings=[
            {"column": c.name, "meaning": _cell(f"{c.meaning}; {c.value_range}")} for c in score_columns()
        ],
        drop_reasons=_drop_reason_rows(summary, ratios),
        duplicates={"groups": 0, **summary.duplicate_groups, "threshold": THUMBNAIL_SIMILARITY},
        plots=plots,
        command=redact(command) if command else None,
        parameter_groups=_parameter_groups(config),
        versions={str(k): str(v) for k, v in versions.items()},
        citation=CITATION,
    )
    return DatasetCard(redact(content))


def render_adapter_card(
    output_dir: str | Path, model_repo_id: str | None = None, dataset_repo_id: str | None = None
) -> ModelCard:
    """The model card of the run's adapters (``output_dir/adapter``), for the model repo they are pushed to."""
    output_dir = Path(output_dir)
    config, summary = read_run(output_dir)
    peft_path = output_dir / ADAPTER_DIR / "adapter_config.json"
    peft = json.loads(peft_path.read_text()) if peft_path.exists() else {}
    candidates = [config.get("model_name_or_path") or summary.model, peft.get("base_model_name_or_path")]
    base_model = next((c for c in candidates if is_hub_repo_id(c)), None)
    # Never a guess shown as a fact: an unknown checkpoint is written as a placeholder the reader must fill in.
    base_name = base_model or next((c for c in candidates if c), "<the CLIP checkpoint the adapters were trained on>")
    source_name = config.get("dataset_name") or (config.get("source") or {}).get("description") or summary.dataset
    source_name = source_name or "unknown"
    training = {"base model revision": summary.model_revision or config.get("model_revision") or "not pinned"}
    if peft:
        training.update(
            {
                "peft_type": peft.get("peft_type"),
                "r": peft.get("r"),
                "lora_alpha": peft.get("lora_alpha"),
                "target_modules": sorted(peft.get("target_modules") or []),
            }
        )
    training.update({key: config[key] for key in TRAINING_KEYS if key in config})
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag="zero-shot-image-classification",
        datasets=[source_name] if is_hub_repo_id(source_name) else None,
        tags=["hf-clipsel", "clip", "lora", "data-selection"],
    )
    content = _render(
        ADAPTER_CARD_TEMPLATE,
        card_data=card_data.to_yaml(),
        title=f"CLIP adapters for data selection on {source_name}",
        base_model=base_name,
        base_model_link=_link(base_name) if base_model or any(candidates) else "`an unrecorded CLIP checkpoint`",
        base_model_revision=summary.model_revision or config.get("model_revision"),
        source={
            "name": source_name,
            "link": _link(source_name, "dataset"),
            "split": config.get("dataset_split", "train"),
        },
        dataset_link=_link(dataset_repo_id, "dataset") if dataset_repo_id else None,
        peft={"description": _peft_summary(output_dir)},
        prompts=config.get("prompt_templates") or [],
        load_target=model_repo_id or str(output_dir / ADAPTER_DIR),
        training={k: _cell(v) for k, v in training.items()},
        versions={str(k): str(v) for k, v in (config.get("versions") or {}).items()},
        citation=CITATION,
    )
    return ModelCard(redact(content))


def _drop_reason_rows(summary: RunSummary, ratios: list[float]) -> list[dict]:
    """Per drop reason (in order of precedence) the rows each ratio dropped for it, from the run summary."""
    rows = []
    for reason in reason_order(drop_reason_order()):
        counts = [
            summary.ratios[f"{r:g}"].dropped_by_reason.get(reason, 0) if f"{r:g}" in summary.ratios else "n/a"
            for r in ratios
        ]
        if reason and any(count not in (0, "n/a") for count in counts):
            rows.append({"reason": reason, "counts": counts})
    return rows
