"""hf_clipsel: CLIP-powered data selection (Yang et al., ICLR 2025) for Hugging Face datasets.

    import hf_clipsel

    config = hf_clipsel.ClipselConfig.from_flat(
        {"dataset_name": "uoft-cs/cifar10", "model_name_or_path": "openai/clip-vit-base-patch32",
         "selection_ratios": [0.3, 0.5], "output_dir": "outputs/cifar10"}
    )
    summary = hf_clipsel.run(config)                    # embed, adapt, score, select, write
    finished = hf_clipsel.load_run("outputs/cifar10")   # or a Hub dataset repo it was pushed to
    finished.subsets[0.3], finished.scores

The names below are the public API (the configurations, the commands, a finished run, and the extension points:
selectors, scores); they are imported on first use, so `import hf_clipsel` stays fast. The stages one by one are in
hf_clipsel.pipeline.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that owns it: the configurations, the commands, a finished run, and the extension points
_EXPORTS = {
    "ClipselConfig": "configs",
    "DataConfig": "configs",
    "ModelConfig": "configs",
    "AdapterConfig": "configs",
    "ScoringConfig": "scoring_config",
    "SelectionConfig": "configs",
    "RunConfig": "configs",
    "parse_config": "parser",
    "run": "pipeline",
    "embed": "pipeline",
    "adapt": "pipeline",
    "score": "pipeline",
    "select_from_scores": "pipeline",
    "push": "pipeline",
    "report": "pipeline",
    "clean": "pipeline",
    "load_run": "runs.load",
    "FinishedRun": "runs.load",
    "RunSummary": "summary",
    "budget": "core.names",
    "register_selector": "selection",
    "SelectionInputs": "selection",
    "SelectionResult": "selection",
    "register_score": "scores",
    "Score": "scores",
    "Column": "scores",
    "ScoreInputs": "scores",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_clipsel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
