"""Selection quality: the method against baselines on CIFAR-10 with label noise.

For each noise case (default: 20% and 40% symmetric label noise, hf_clipsel.benchmarking.noise, seeded, with its
record) on a pool drawn from the CIFAR-10 training split, and each selection ratio (0.3, 0.5, 0.8):

- selectors, all through the package: the method (`exact`, package defaults: projection adapters trained on the
  pool's noisy labels with the held-out check, alpha 0.1, gate, posterior term, damage check) with
  `hf_clipsel.pipeline.run`, once per noise case (embed + adapt + score + select); `random`, `clip_score`, `ccs` from
  the method's saved scores with `pipeline.select_from_scores`; `moderate` the same, given the image features
  (saved scores do not hold them); and the zero-shot alignment score alone ("SAS zero-shot":
  adapter_preset none, clip_score), a second `run` on the same embedding cache; the published method
  (`--preset paper`), a third `run`; and variants of the method from its saved scores (--variants: ungated,
  class-balanced, alpha = ratio), selected only unless also given to --selectors;
- for every kept set: the fraction of its rows the injector changed (next to the pool's), and the top-1 on held-out
  CIFAR-10 test rows of a fixed timm model trained from scratch on it with a fixed budget, over several seeds;
- references: the full noisy pool (ratio 1.0) and, as an oracle, its clean rows only.

Without the Hub there is no pretrained CLIP: the script first trains a proxy CLIP (proxy_clip.py) on CIFAR-10 test
rows 0..7999 and reports its zero-shot top-1 on rows 8000..9999, which are also the downstream evaluation rows and
are never trained on. `--model_name_or_path openai/clip-vit-base-patch32` skips the proxy.

Every piece is cached under --work_dir (proxy, pools, selection outputs, one JSON per training run): a rerun, or a
killed run started again, skips what is finished. Outputs: --results_prefix.md (tables) and .png (plot), and
results.json in --work_dir.

Default configuration: about 46 minutes on a 2-core CPU shared with other jobs, the sum of its measured pieces
(recipes/benchmarks/README.md).
On a GPU with a real CLIP, e.g.:

    python recipes/benchmarks/bench_quality.py --model_name_or_path openai/clip-vit-base-patch32 --pool_size 50000 \
        --trainer recipe --train_model resnet18 --epochs 200 --seeds 0 1 2 --noise_levels 0.2 0.4 \
        --asymmetric 0.3 --corruption 0.05 --work_dir outputs/quality
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from _common import DATA_DIR_HELP, load_cifar10
from datasets import Dataset
from proxy_clip import FAMILIES, VIEWS, ProxySpec, decode_uint8, train_proxy, zero_shot_accuracy
from quality_cleanlab import cleanlab_masks
from quality_train import TrainSpec, train_minimal, train_recipe

from hf_clipsel import pipeline
from hf_clipsel.benchmarking.noise import CORRUPTIONS, asymmetric_label_noise, corrupt_images, symmetric_label_noise
from hf_clipsel.configs import ClipselConfig, budget, ratio_name
from hf_clipsel.context import load_context
from hf_clipsel.core.names import selected_column
from hf_clipsel.embedding import embed_stage
from hf_clipsel.runs.load import read_scores
from hf_clipsel.runs.record import IncompleteRunError, verify
from hf_clipsel.scores import score_columns
from hf_clipsel.scores_table import score_stage
from hf_clipsel.selection.registry import kept_share

REPO = Path(__file__).resolve().parents[2]
METHOD, ZERO_SHOT, PAPER, UNGATED, BALANCED, ALPHA_RATIO, FORCED, PREVIOUS, CLEANLAB = (
    "exact",
    "sas_zero_shot",
    "exact_paper",
    "exact_ungated",
    "exact_balanced",
    "exact_alpha_ratio",
    "exact_forced",
    "exact_previous",
    "cleanlab",
)
# Selected by select_from_scores on the method's saved scores: no model needed.
FROM_SAVED_SCORES = ("random", "clip_score", "ccs", UNGATED, BALANCED, ALPHA_RATIO, PREVIOUS)
SELECTORS = (METHOD, "random", "clip_score", "moderate", "ccs", ZERO_SHOT)
# Selected here from the method run's class probabilities (quality_cleanlab.py), not by the package: no subset folder.
OUTSIDE = (CLEANLAB,)
VARIANTS = (
    PAPER,
    UNGATED,
    BALANCED,
    ALPHA_RATIO,
    FORCED,
    PREVIOUS,
)  # the method with other settings: selection only (noise kept) unless also in --selectors
LABELS = {
    METHOD: "method (exact, package defaults)",
    PAPER: "method, preset paper (alpha = ratio, no held-out check)",
    UNGATED: "method with diversity_gate none",
    BALANCED: "method with class_balanced quotas",
    ALPHA_RATIO: "method with alpha = ratio",
    FORCED: "method, adapters forced on (adapter_holdout_fraction 0)",
    PREVIOUS: "previous default (alignment sas+posterior, damage_threshold 3)",
    "random": "random",
    "clip_score": "clip_score (adapted SAS)",
    "moderate": "moderate (Moderate-DS)",
    "ccs": "ccs (CCS on adapted SAS)",
    ZERO_SHOT: "SAS zero-shot (no adapter)",
    CLEANLAB: "cleanlab self-confidence of the same CLIP's probabilities",
    "full": "full pool",
    "clean": "clean rows only (oracle)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", default="/tmp/quality/work", help="Cache of every intermediate result.")
    p.add_argument("--data_dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--results_prefix", default=str(Path(__file__).parent / "quality_cifar10"))
    p.add_argument("--model_name_or_path", default=None, help="A CLIP checkpoint; default: train the proxy.")
    p.add_argument("--proxy_epochs", type=int, default=ProxySpec.epochs)
    p.add_argument(
        "--proxy_family",
        choices=tuple(FAMILIES),
        default="clip",
        help="The proxy's model family (proxy_clip.py): clip, siglip (sigmoid loss), siglip2 (NaFlex, sigmoid loss), "
        "metaclip2.",
    )
    p.add_argument("--proxy_rows", type=int, default=8000, help="Test rows 0..N-1 train the proxy.")
    p.add_argument(
        "--proxy_view",
        choices=VIEWS,
        default="colour",
        help="The view of its training rows the proxy is pre-trained on; the pools stay in colour, so greyscale "
        "makes the domain-shift case (weak zero-shot alignment, something for the adapters to learn).",
    )
    p.add_argument("--eval_start", type=int, default=8000, help="Test rows from here on: downstream evaluation.")
    p.add_argument("--pool_size", type=int, default=10000, help="Rows drawn from the training split (seeded).")
    p.add_argument("--pool_seed", type=int, default=0)
    p.add_argument("--noise_levels", type=float, nargs="*", default=[0.2, 0.4], help="Symmetric label noise.")
    p.add_argument("--asymmetric", type=float, nargs="*", default=[], help="CIFAR-10 asymmetric flips, e.g. 0.3.")
    p.add_argument("--corruption", type=float, nargs="*", default=[], help="Fractions of damaged images, e.g. 0.05.")
    p.add_argument("--corruption_type", choices=CORRUPTIONS, default="gaussian_noise")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--noise_seed", type=int, default=0)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.8])
    p.add_argument(
        "--selectors",
        nargs="+",
        choices=SELECTORS + VARIANTS + OUTSIDE,
        default=[*SELECTORS, PAPER],
        help="Trained on. cleanlab needs `pip install cleanlab` (quality_cleanlab.py).",
    )
    p.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS + OUTSIDE,
        default=[UNGATED],
        help="Selected and reported (share of injected rows kept) but not trained on, unless also in --selectors.",
    )
    p.add_argument("--embed_batch_size", type=int, default=64, help="hf_clipsel's batch_size (embedding).")
    p.add_argument("--trainer", choices=("minimal", "recipe"), default="minimal", help="See quality_train.py.")
    p.add_argument("--train_model", default="test_resnet", help="timm model, from scratch, the same for every run.")
    budget_group = p.add_mutually_exclusive_group()
    budget_group.add_argument("--train_steps", type=int, default=None, help="Fixed steps per run (default 200).")
    budget_group.add_argument("--epochs", type=int, default=None, help="Fixed epochs per run instead of steps.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--cached_only",
        action="store_true",
        help="Train nothing: report the training runs already cached (a cell's seeds are listed when some lack).",
    )
    p.add_argument(
        "--no_references", action="store_true", help="Do not train on the full pool and its clean rows (references)."
    )
    p.add_argument(
        "--stability_seeds",
        type=int,
        nargs="*",
        default=[],
        help="Select again with these seeds (the adapters' training seed and held-out split) for the method and, "
        "when selected, the forced adapters, and report the overlap of the kept sets with seed 0's.",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared; 0: torch's own).")
    args = p.parse_args(argv)
    if args.train_steps is None and args.epochs is None:
        args.train_steps = 200
    if args.proxy_rows > args.eval_start:
        p.error("--proxy_rows must not reach into the evaluation rows (--eval_start).")
    return args


def git_commit() -> str:
    """The repository's commit, with `+changes` when hf_clipsel/ differs from it (the numbers depend on it)."""
    import subprocess

    def git(*arguments):
        return subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", "hf_clipsel") else "")


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2))
    partial.replace(path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def timed_piece(work_dir: Path, name: str, fn):
    """Run ``fn``; record its seconds in work_dir/timing.json unless a finished earlier run recorded them."""
    start = time.perf_counter()
    result = fn()
    timing = read_json(work_dir / "timing.json") or {}
    timing.setdefault(name, round(time.perf_counter() - start, 1))
    write_json(work_dir / "timing.json", timing)
    return result


# ---------------------------------------------------------------- cache layout: one key per setting that matters


def proxy_dir(args) -> Path:
    view = "" if args.proxy_view == "colour" else f"-{args.proxy_view}"
    family = "" if args.proxy_family == "clip" else f"-{args.proxy_family}"
    return Path(args.work_dir) / f"proxy-rows{args.proxy_rows}-epochs{args.proxy_epochs}{view}{family}"


def model_key(args) -> str:
    return proxy_dir(args).name if args.model_name_or_path is None else args.model_name_or_path.replace("/", "__")


def pool_key(args, case: dict) -> str:
    return f"{case['name']}-pool{args.pool_size}-seed{args.pool_seed}-noiseseed{args.noise_seed}"


def ratios_key(args) -> str:
    return "ratios" + "-".join(f"{r:g}" for r in args.ratios)


def pool_dir(args, case: dict) -> Path:
    return Path(args.work_dir) / "pools" / pool_key(args, case)


def train_dir(args, case: dict, spec: TrainSpec) -> Path:
    budget_name = f"steps{spec.steps}" if spec.steps else f"epochs{spec.epochs}"
    run_key = f"{args.trainer}-{spec.model}-{budget_name}-batch{spec.batch_size}-lr{spec.lr:g}"
    return Path(args.work_dir) / "train" / model_key(args) / pool_key(args, case) / ratios_key(args) / run_key


# ---------------------------------------------------------------- data, proxy


def ensure_heldout(args, test) -> Path:
    """The evaluation rows as a parquet `test` split (for the recipe trainer)."""
    folder = Path(args.work_dir) / "heldout"
    path = folder / "test-00000-of-00001.parquet"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        test.select(range(args.eval_start, len(test))).to_parquet(str(path) + ".partial")
        Path(str(path) + ".partial").replace(path)
    return folder


def ensure_model(args, test, class_names) -> tuple[str, dict[str, float]]:
    """The CLIP to select with (given, or the proxy, trained once on --proxy_view) and its zero-shot top-1 on the
    evaluation rows in each view ({view: top-1})."""
    work_dir = Path(args.work_dir)
    path = args.model_name_or_path
    if path is None:
        path = str(proxy_dir(args))
        if not (Path(path) / "model.safetensors").exists():
            rows = test.select(range(args.proxy_rows))
            spec = ProxySpec(epochs=args.proxy_epochs)

            def build():
                return train_proxy(
                    path,
                    decode_uint8(rows, view=args.proxy_view),
                    torch.tensor(rows["label"]),
                    class_names,
                    spec,
                    path + ".state.pt",
                    family=args.proxy_family,
                )

            timed_piece(work_dir, "proxy_training", build)
    cached = read_json(work_dir / "zero_shot.json") or {}
    heldout = test.select(range(args.eval_start, len(test)))
    for view in VIEWS:
        key = path if view == "colour" else f"{path}@{view}"
        if key not in cached:
            cached[key] = zero_shot_accuracy(path, heldout, class_names, view=view)
            write_json(work_dir / "zero_shot.json", cached)
    return path, {view: cached[path if view == "colour" else f"{path}@{view}"] for view in VIEWS}


# ---------------------------------------------------------------- noise cases and pools


def noise_cases(args) -> list[dict]:
    cases = [{"name": f"sym{round(f * 100)}", "kind": "symmetric", "fraction": f} for f in args.noise_levels]
    cases += [{"name": f"asym{round(f * 100)}", "kind": "asymmetric", "fraction": f} for f in args.asymmetric]
    cases += [
        {
            "name": f"corrupt{round(f * 100)}_{args.corruption_type}_s{args.severity}",
            "kind": "corruption",
            "fraction": f,
        }
        for f in args.corruption
    ]
    return cases


def case_title(case: dict, args) -> str:
    percent = f"{case['fraction'] * 100:g}%"
    if case["fraction"] == 0:
        return "clean labels (nothing injected)"
    if case["kind"] == "symmetric":
        return f"{percent} symmetric label noise"
    if case["kind"] == "asymmetric":
        return f"{percent} asymmetric label noise (CIFAR-10 flips)"
    return f"{percent} damaged images ({args.corruption_type}, severity {args.severity})"


def ensure_pool(args, train, case: dict) -> Path:
    """work_dir/pools/<case>/pool/train-*.parquet: the pool with noise injected (columns img, label, train_row,
    clean_label, is_noisy), the injector's record beside it, and the clean rows in clean/ (for the recipe trainer)."""
    folder = pool_dir(args, case)
    path = folder / "pool" / "train-00000-of-00001.parquet"
    if path.exists():
        return path
    if args.pool_size < len(train):
        rows = np.sort(np.random.default_rng(args.pool_seed).choice(len(train), args.pool_size, replace=False))
    else:
        rows = np.arange(len(train))
    pool = train.select(rows.tolist()).add_column("train_row", rows.astype(np.int64).tolist())
    common = dict(seed=args.noise_seed, add_noise_columns=True)
    if case["kind"] == "symmetric":
        noisy, record = symmetric_label_noise(pool, case["fraction"], **common)
    elif case["kind"] == "asymmetric":
        noisy, record = asymmetric_label_noise(pool, case["fraction"], **common)
    else:
        noisy, record = corrupt_images(pool, case["fraction"], args.corruption_type, args.severity, **common)
    record.to_parquet(str(folder / "record.parquet"))
    clean = noisy.filter(lambda flags: [not f for f in flags], input_columns="is_noisy", batched=True)
    (folder / "clean").mkdir(parents=True, exist_ok=True)
    clean.to_parquet(str(folder / "clean" / "train-00000-of-00001.parquet"))
    (folder / "pool").mkdir(parents=True, exist_ok=True)
    noisy.to_parquet(str(path) + ".partial")  # the pool file last: its presence means the folder is complete
    Path(str(path) + ".partial").replace(path)
    return path


def pool_columns(pool_file: Path) -> dict[str, np.ndarray]:
    names = pq.read_schema(pool_file).names
    table = pq.read_table(pool_file, columns=[c for c in ("label", "clean_label", "is_noisy") if c in names])
    columns = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    columns.setdefault("clean_label", columns["label"])  # image corruptions leave the labels as they were
    return columns


# ---------------------------------------------------------------- selection through the package


def selection_config(args, case: dict, pool_file: Path, model: str, selector: str, seed: int = 0) -> ClipselConfig:
    run_dir = Path(args.work_dir) / "runs" / model_key(args) / pool_key(args, case) / ratios_key(args)
    values = {
        "seed": seed,
        "dataset_name": str(pool_file),
        "image_column": "img",
        "label_column": "label",
        "model_name_or_path": model,
        "selection_ratios": list(args.ratios),
        "selection_method": "clip_score" if selector == ZERO_SHOT else METHOD if selector in VARIANTS else selector,
        "output_dir": str(run_dir / (selector if seed == 0 else f"{selector}-seed{seed}")),
        "cache_dir": str(run_dir / "embeddings"),  # one embedding pass per case, shared by both runs
        "batch_size": args.embed_batch_size,
        "overwrite_output_dir": True,  # only reached when finished() found other settings there
    }
    if selector == ZERO_SHOT:  # the zero-shot alignment score alone: no adapters, SAS only, no damage check
        values.update(adapter_preset="none", alignment="sas", damage_check=False)
    elif selector == PAPER:
        values["preset"] = "paper"
    elif selector == UNGATED:
        values["diversity_gate"] = "none"
    elif selector == BALANCED:
        values["class_balanced"] = True
    elif selector == ALPHA_RATIO:  # the paper's alpha with the default's gate, posterior term and damage check
        values["alpha"] = None
    elif selector == PREVIOUS:  # the defaults before issue 28
        values.update(alignment="sas+posterior", damage_threshold=3.0)
    elif selector == FORCED:  # the default with the held-out check off: adapters trained on every row, kept
        values["adapter_holdout_fraction"] = 0.0
    return ClipselConfig.from_flat(values)


def finished(config: ClipselConfig) -> bool:
    """The selection is written, was made with these settings (a changed library default reruns it), and its scores
    have every column the library writes now (new scores, e.g. a new pixel statistic, rerun it too)."""
    try:
        record = verify(config.run.output_dir)
    except IncompleteRunError:
        return False
    columns = set(read_scores(config.run.output_dir).column_names)
    return record.disagreements(config) == [] and {column.name for column in score_columns()} <= columns


def saved_scores(config: ClipselConfig):
    return read_scores(config.run.output_dir)


def ensure_selections(args, case: dict, pool_file: Path, model: str) -> dict[str, ClipselConfig]:
    work_dir = Path(args.work_dir)
    configs = {s: selection_config(args, case, pool_file, model, s) for s in SELECTORS + VARIANTS}
    command = ["bench_quality.py", case["name"]]
    method = configs[METHOD]
    if not finished(method):
        timed_piece(work_dir, f"{case['name']}/pipeline_run_exact", lambda: pipeline.run(method, command=command))
    wanted = [s for s in all_selectors(args) if s not in (METHOD, *OUTSIDE) and not finished(configs[s])]
    method_scores = saved_scores(method) if wanted else None
    for selector in wanted:
        config = configs[selector]
        name = f"{case['name']}/{selector}"
        if selector in FROM_SAVED_SCORES:
            work = lambda c=config: pipeline.select_from_scores(c, command, scores=method_scores)  # noqa: E731
        elif selector == "moderate":
            work = lambda c=config: select_moderate(method, c, method_scores, command)  # noqa: E731
        else:  # zero-shot alignment alone, or the paper preset: a run of its own, on the same embedding cache
            work = lambda c=config: pipeline.run(c, command=command)  # noqa: E731
        timed_piece(work_dir, name, work)
    for selector, seed in stability_runs(args):
        config = selection_config(args, case, pool_file, model, selector, seed)
        configs[f"{selector}-seed{seed}"] = config
        if not finished(config):
            run = lambda c=config: pipeline.run(c, command=command)  # noqa: E731
            timed_piece(work_dir, f"{case['name']}/{selector}-seed{seed}", run)
    return configs


def stability_runs(args) -> list[tuple[str, int]]:
    """(selector, seed) of the extra selections that measure stability across adapter-training seeds."""
    selectors = [METHOD] + ([FORCED] if FORCED in all_selectors(args) else [])
    return [(selector, seed) for selector in selectors for seed in args.stability_seeds if seed != 0]


def all_selectors(args) -> list[str]:
    return list(args.selectors) + [v for v in args.variants if v not in args.selectors]


def select_moderate(method: ClipselConfig, config: ClipselConfig, method_scores, command) -> None:
    """Moderate-DS needs the image features, which saved scores do not carry: score again with the method's saved
    adapters on the cached embeddings (the same numbers as the method's run, checked), then select_from_scores with
    those features."""
    context = load_context(method)
    embeddings = embed_stage(context)
    model = pipeline.trained_model(context)
    embeddings = pipeline.scoring_embeddings(context, model, embeddings)
    scores, features = score_stage(context, model, embeddings)  # features: the out-of-core FeatureStore
    for column in ("semantic_alignment", "sample_diversity"):
        again, saved = np.asarray(scores[column][:]), np.asarray(method_scores[column][:])
        if not np.allclose(again, saved, atol=1e-5):
            raise RuntimeError(
                f"scoring again gave other {column} values than the method's run (max diff "
                f"{np.abs(again - saved).max():.3g})."
            )
    pipeline.select_from_scores(config, command, scores=scores, image_features=features)


def kept_masks(args, configs: dict[str, ClipselConfig], num_rows: int) -> dict[str, dict[float, np.ndarray]]:
    """{selector: {ratio: bool[N]}}, read back from each selection's written scores, each of exactly its budget."""
    masks = {}
    for selector in all_selectors(args):
        if selector == CLEANLAB:  # the method run's probabilities, ranked by cleanlab
            saved_alignment = saved_scores(configs[METHOD])["semantic_alignment"]
            masks[selector] = cleanlab_masks(configs[METHOD], args.ratios, saved_alignment)
        else:
            masks[selector] = selected_masks(args, configs[selector], num_rows)
        for ratio, mask in masks[selector].items():
            if mask.sum() != budget(ratio, num_rows):
                raise RuntimeError(f"{selector} kept {mask.sum()} rows at {ratio}, not {budget(ratio, num_rows)}.")
    return masks


def check_written_subset(config: ClipselConfig, ratio: float, mask: np.ndarray) -> None:
    """The subset folder users train on holds exactly the rows of the mask."""
    files = sorted((Path(config.run.output_dir) / "subsets" / ratio_name(ratio)).glob("*.parquet"))
    row_ids = np.concatenate([pq.read_table(f, columns=["row_id"])["row_id"].to_numpy() for f in files])
    if not np.array_equal(np.sort(row_ids), np.flatnonzero(mask)):
        raise RuntimeError(f"{config.run.output_dir}: written subset {ratio} differs from its is_selected column.")


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive row > score of a negative row), ties count half; nan when one class is absent."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, score))


# The selections whose scores come from a model of their own (the others reuse the method's scores).
SCORED = (ZERO_SHOT, METHOD, FORCED, PAPER)


def score_diagnostics(args, configs, columns) -> dict:
    """Per selection with scores of its own: how well its features classify the pool (top-1 against the clean
    labels), how often they predict the injected (wrong) label on the injected rows (1 = the adapters learned the
    noise), how well its SAS and reward separate the injected rows (AUROC, 0.5 = chance; for SAS and the reward low
    = injected, so 1 - AUROC of the raw score); the method's held-out check; and the overlap of kept sets across
    adapter-training seeds."""
    noisy = columns["is_noisy"].astype(bool)
    out = {}
    for selector in SCORED:
        output_dir = Path(configs[selector].run.output_dir)
        if not (output_dir / "run_record.json").exists():
            continue
        table = read_scores(output_dir).to_dict()
        reward = next((c for c in table if c.startswith("reward_")), None)
        out[selector] = {
            "pool_top1_clean_labels": _share(table["predicted_label"], columns["clean_label"], None),
            "predicts_injected_label_on_injected_rows": _share(table["predicted_label"], columns["label"], noisy),
            "auroc_sas_low": 1 - auroc(np.asarray(table["semantic_alignment"]), noisy),
            "auroc_reward_low": 1 - auroc(np.asarray(table[reward]), noisy) if reward else float("nan"),
            "auroc_sds_high": auroc(np.asarray(table["sample_diversity"]), noisy),
        }
        if (output_dir / "adapter").exists():
            out[selector]["adapters_moved"] = float(adapter_moved(output_dir / "adapter"))
        check = json.loads((output_dir / "run_summary.json").read_text()).get("adapter_check") or {}
        if check:
            out[selector].update(
                check_adapted_agreement=check.get("adapted_agreement", float("nan")),
                check_zero_shot_agreement=check.get("zero_shot_agreement", float("nan")),
                check_fell_back=float(check.get("fell_back", float("nan"))),
            )
        out[selector] = {key: round(value, 4) for key, value in out[selector].items()}
    out["seed_overlap"] = {}
    for selector, seed in stability_runs(args):
        base = selected_masks(args, configs[selector], len(noisy))
        other = selected_masks(args, configs[f"{selector}-seed{seed}"], len(noisy))
        shares = {ratio: kept_share(base[ratio], other[ratio]) for ratio in args.ratios}
        out["seed_overlap"][f"{selector}-seed{seed}"] = {f"{r:g}": round(float(v), 4) for r, v in shares.items()}
    return out


def selected_masks(args, config: ClipselConfig, num_rows: int) -> dict[float, np.ndarray]:
    """{ratio: bool[N]} from a selection's written scores (is_selected_ratio_<r>), checked to be in pool row order."""
    columns = ["row_id", *(selected_column(r) for r in args.ratios)]
    table = read_scores(config.run.output_dir).select_columns(columns).to_dict()
    if not np.array_equal(np.asarray(table["row_id"]), np.arange(num_rows)):
        raise RuntimeError(f"{config.run.output_dir}: scores are not in pool row order.")
    return {ratio: np.asarray(table[selected_column(ratio)], dtype=bool) for ratio in args.ratios}


def adapter_moved(adapter_dir: Path) -> bool:
    """LoRA starts at B = 0 (zero-shot CLIP); early stopping may keep that state. True if any B moved."""
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return any(bool(t.abs().sum() > 0) for name, t in weights.items() if "lora_B" in name)


def _share(predicted, reference, rows) -> float:
    predicted, reference = np.asarray(predicted), np.asarray(reference)
    rows = np.ones(len(predicted), dtype=bool) if rows is None else rows
    return float((predicted[rows] == reference[rows]).mean()) if rows.any() else float("nan")


# ---------------------------------------------------------------- training


def training_subsets(args, masks, columns) -> dict[str, np.ndarray]:
    """{subset name: bool[N]}: every selector x ratio, the full pool, the clean rows."""
    subsets = {f"{s}@{r:g}": masks[s][r] for s in args.selectors for r in args.ratios}
    if args.no_references:
        return subsets
    subsets["full@1"] = np.ones(len(columns["label"]), dtype=bool)
    if columns["is_noisy"].any():  # with no injected rows the clean rows are the full pool
        subsets["clean"] = ~columns["is_noisy"].astype(bool)
    return subsets


def run_training(args, case, name, mask, seed, spec, tensors, configs, heldout_dir) -> dict:
    path = train_dir(args, case, spec) / name / f"seed{seed}.json"
    rows_digest = hashlib.sha256(np.flatnonzero(mask).astype(np.int64).tobytes()).hexdigest()[:16]
    result = read_json(path)
    if result is not None and result.get("rows_digest") == rows_digest:  # the same rows: reuse
        return result
    if args.cached_only:
        return None
    if args.trainer == "minimal":
        images, labels, test_images, test_labels = tensors
        rows = torch.from_numpy(np.flatnonzero(mask))
        result = train_minimal(images[rows], labels[rows], test_images, test_labels, spec, seed)
    else:
        pools = pool_dir(args, case)
        if name == "full@1":
            dataset, config_name, data_dir = "parquet", None, str(pools / "pool")
        elif name == "clean":
            dataset, config_name, data_dir = "parquet", None, str(pools / "clean")
        elif name.partition("@")[0] in OUTSIDE:  # no subset folder of the package's: write the kept rows
            subset = path.with_suffix("") / "subset"
            if not (subset / "train-00000-of-00001.parquet").exists():
                subset.mkdir(parents=True, exist_ok=True)
                rows = np.flatnonzero(mask).tolist()
                Dataset.from_parquet(str(next((pools / "pool").glob("*.parquet")))).select(rows).to_parquet(
                    str(subset / "train-00000-of-00001.parquet")
                )
            dataset, config_name, data_dir = "parquet", None, str(subset)
        else:
            selector, ratio = name.split("@")
            dataset, config_name, data_dir = configs[selector].run.output_dir, ratio_name(float(ratio)), None
        output_dir = path.with_suffix("")
        result = train_recipe(
            dataset, config_name, data_dir, str(heldout_dir), int(mask.sum()), spec, seed, output_dir
        )
    result["rows_digest"] = rows_digest
    write_json(path, result)
    return result


# ---------------------------------------------------------------- report


def summarize(args, cases, per_case) -> list[dict]:
    rows = []
    for case in cases:
        info = per_case[case["name"]]
        selection_only = {f"{s}@{r:g}": info["masks"][s][r] for s in all_selectors(args) for r in args.ratios}
        for name, mask in {**selection_only, **info["subsets"]}.items():
            selector, _, ratio = name.partition("@")
            results = info["results"].get(name, {})
            accuracies = [results[seed]["top1"] for seed in args.seeds if seed in results]
            rows.append(
                {
                    "case": case["name"],
                    "selector": selector,
                    "ratio": float(ratio) if ratio else round(float(mask.mean()), 4),
                    "kept": int(mask.sum()),
                    "noisy_kept": round(float(info["noisy"][mask].mean()), 4),
                    "top1_mean": round(float(np.mean(accuracies)), 4) if accuracies else None,
                    "top1_std": round(float(np.std(accuracies, ddof=1)), 4) if len(accuracies) > 1 else None,
                    "top1_runs": [round(a, 4) for a in accuracies],
                }
            )
    return rows


def markdown(args, cases, per_case, rows, model_line) -> str:
    lines = [model_line, ""]
    for case in cases:
        info = per_case[case["name"]]
        lines += [
            f"**{case_title(case, args)}**: pool of {info['num_rows']:,} training rows, "
            f"{int(info['noisy'].sum()):,} changed by the injector ({info['noisy'].mean():.1%}). "
            f"Cells: share of the kept rows that the injector changed / top-1 (%) on held-out test rows, mean ± std "
            f"over seeds {', '.join(map(str, args.seeds))}.",
            "",
            "| selector | " + " | ".join(f"ratio {r:g}" for r in args.ratios) + " |",
            "|---|" + "---|" * len(args.ratios),
        ]
        by_key = {(r["selector"], r["ratio"]): r for r in rows if r["case"] == case["name"]}
        for selector in all_selectors(args):
            cells = [_cell(by_key[(selector, ratio)], len(args.seeds)) for ratio in args.ratios]
            lines.append(f"| {LABELS[selector]} | " + " | ".join(cells) + " |")
        for name in ("full", "clean"):
            row = next((r for r in rows if r["case"] == case["name"] and r["selector"] == name), None)
            if row is None:  # no injected rows: the clean rows are the full pool
                continue
            lines.append(
                f"| {LABELS[name]} (ratio {row['ratio']:g}, {row['kept']:,} rows) | "
                + " | ".join([_cell(row)] + [""] * (len(args.ratios) - 1))
                + " |"
            )
        lines += ["", *versus_line(args, by_key), *diagnostics_table(info["diagnostics"]), ""]
    return "\n".join(lines)


def versus_line(args, by_key) -> list[str]:
    """The method's top-1 minus cleanlab's per ratio, with the standard error of that difference (each mean's
    sample std / sqrt(seeds), combined), when both were trained with at least two seeds."""
    cells = []
    for ratio in args.ratios:
        ours, theirs = by_key.get((METHOD, ratio)), by_key.get((CLEANLAB, ratio))
        if not ours or not theirs or len(ours["top1_runs"]) < 2 or len(theirs["top1_runs"]) < 2:
            return []
        difference = 100 * (np.mean(ours["top1_runs"]) - np.mean(theirs["top1_runs"]))
        error = 100 * np.sqrt(
            np.var(ours["top1_runs"], ddof=1) / len(ours["top1_runs"])
            + np.var(theirs["top1_runs"], ddof=1) / len(theirs["top1_runs"])
        )
        ratio_of_error = f" ({difference / error:+.1f} SE)" if error > 0 else ""
        cells.append(f"{ratio:g}: {difference:+.1f} ± {error:.1f}{ratio_of_error}")
    return [f"Top-1 of the method minus cleanlab's (± standard error of the difference): {'; '.join(cells)}.", ""]


def diagnostics_table(diagnostics: dict) -> list[str]:
    """The score diagnostics of score_diagnostics as markdown lines."""

    def number(value, percent=False):
        if value is None or value != value:
            return "n/a"
        return f"{value:.1%}" if percent else f"{value:.3f}"

    lines = [
        "| scores from | pool top-1 against the clean labels | predicts the injected label on injected rows | "
        "AUROC, SAS | AUROC, reward | adapters trained / moved | held-out check: adapted vs zero-shot, fell back |",
        "|---|---|---|---|---|---|---|",
    ]
    for selector in SCORED:
        if selector not in diagnostics:
            continue
        d = diagnostics[selector]
        moved = {1.0: "yes / yes", 0.0: "yes / no (early stopping kept the start)"}.get(d.get("adapters_moved"), "no")
        check = "n/a"
        if "check_fell_back" in d:
            fell = {1.0: "yes", 0.0: "no"}.get(d["check_fell_back"], "n/a")
            check = f"{number(d['check_adapted_agreement'])} vs {number(d['check_zero_shot_agreement'])}, {fell}"
        lines.append(
            f"| {LABELS[selector]} | {number(d['pool_top1_clean_labels'], True)} | "
            f"{number(d['predicts_injected_label_on_injected_rows'], True)} | {number(d['auroc_sas_low'])} | "
            f"{number(d['auroc_reward_low'])} | {moved} | {check} |"
        )
    for name, overlaps in diagnostics["seed_overlap"].items():
        selector, _, seed = name.rpartition("-seed")
        cells = ", ".join(f"{ratio}: {share:.3f}" for ratio, share in overlaps.items())
        lines += ["", f"Kept-set overlap of {LABELS[selector]}, adapter-training seed {seed} against seed 0: {cells}."]
    return lines


def _cell(row, num_seeds: int | None = None) -> str:
    accuracy = "n/a" if row["top1_mean"] is None else f"{100 * row['top1_mean']:.1f}"
    if row["top1_std"] is not None:
        accuracy += f" ± {100 * row['top1_std']:.1f}"
    if row["top1_runs"] and num_seeds and len(row["top1_runs"]) < num_seeds:
        accuracy += f" ({len(row['top1_runs'])} of {num_seeds} seeds)"
    return f"{row['noisy_kept']:.2%} / {accuracy}"


def plot(args, cases, per_case, rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(cases), figsize=(5.2 * len(cases), 8), squeeze=False, sharex=True)
    markers = dict(zip(SELECTORS + VARIANTS + OUTSIDE, "osD^vxPX*hd>p"))
    for column, case in enumerate(cases):
        top, bottom = axes[0][column], axes[1][column]
        case_rows = [r for r in rows if r["case"] == case["name"]]
        for selector in all_selectors(args):
            mine = sorted((r for r in case_rows if r["selector"] == selector), key=lambda r: r["ratio"])
            ratios = [r["ratio"] for r in mine]
            style = dict(marker=markers[selector], label=LABELS[selector])
            if selector == METHOD:
                style.update(linewidth=2.5, color="black")
            if selector not in args.selectors:
                style.update(linestyle="--", alpha=0.8)
            bottom.plot(ratios, [100 * r["noisy_kept"] for r in mine], **style)
            if all(r["top1_mean"] is not None for r in mine):
                means = [100 * r["top1_mean"] for r in mine]
                stds = [100 * (r["top1_std"] or 0) for r in mine]
                top.errorbar(ratios, means, yerr=stds, capsize=3, **style)
        for name, color, linestyle in (("full", "tab:red", "--"), ("clean", "tab:green", ":")):
            row = next((r for r in case_rows if r["selector"] == name), None)
            if row is not None and row["top1_mean"] is not None:
                top.axhline(100 * row["top1_mean"], color=color, linestyle=linestyle, label=LABELS[name])
        pool_rate = 100 * per_case[case["name"]]["noisy"].mean()
        bottom.axhline(pool_rate, color="tab:red", linestyle="--", label="full noisy pool")
        top.set_title(case_title(case, args), fontsize=10)
        top.set_ylabel("top-1 on held-out test rows (%)")
        bottom.set_ylabel("injected rows among the kept rows (%)")
        bottom.set_xlabel("selection ratio")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    axes[1][0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    commit = git_commit()  # at the start: the library this process imports
    arguments = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    # The written tables name a local --data_dir by a placeholder: this machine's folder means nothing to a reader.
    arguments = [
        "path/to/cifar10" if previous == "--data_dir" and Path(a).exists() else a
        for previous, a in zip(["", *arguments], arguments)
    ]
    command = "python " + " ".join(shlex.quote(a) for a in arguments)
    print(f"command: {command}\nwork_dir: {work_dir}\ntorch threads: {torch.get_num_threads()}", flush=True)

    cifar = load_cifar10(args.data_dir)
    class_names = cifar["train"].features["label"].names
    heldout_dir = ensure_heldout(args, cifar["test"])
    model, zero_shot = ensure_model(args, cifar["test"], class_names)
    model_name = (
        model
        if args.model_name_or_path
        else (
            f"proxy {'CLIP' if args.proxy_family == 'clip' else args.proxy_family} trained here on test rows "
            f"0..{args.proxy_rows - 1} in {args.proxy_view}"
        )
    )
    heldout_rows = len(cifar["test"]) - args.eval_start
    views = ", ".join(f"{top1:.1%} in {view}" for view, top1 in zero_shot.items())
    model_line = f"Selection model: {model_name}, zero-shot top-1 on the {heldout_rows:,} held-out test rows: {views}."
    print(model_line, flush=True)

    cases = noise_cases(args)
    spec = TrainSpec(model=args.train_model, steps=args.train_steps, epochs=args.epochs)
    heldout = cifar["test"].select(range(args.eval_start, len(cifar["test"])))
    test_tensors = (decode_uint8(heldout), torch.tensor(heldout["label"])) if args.trainer == "minimal" else None
    per_case = {}
    for case in cases:
        pool_file = timed_piece(work_dir, f"{case['name']}/pool", lambda c=case: ensure_pool(args, cifar["train"], c))
        configs = ensure_selections(args, case, pool_file, model)
        columns = pool_columns(pool_file)
        masks = kept_masks(args, configs, len(columns["label"]))
        for selector in (s for s in all_selectors(args) if s not in OUTSIDE):
            for ratio in args.ratios:
                check_written_subset(configs[selector], ratio, masks[selector][ratio])
        tensors = None
        if args.trainer == "minimal":
            images = decode_uint8(Dataset.from_parquet(str(pool_file), columns=["img"]))
            tensors = (images, torch.from_numpy(columns["label"].astype(np.int64)), *test_tensors)
        per_case[case["name"]] = {
            "configs": configs,
            "num_rows": len(columns["label"]),
            "noisy": columns["is_noisy"].astype(bool),
            "masks": masks,
            "subsets": training_subsets(args, masks, columns),
            "diagnostics": score_diagnostics(args, configs, columns),
            "tensors": tensors,
            "results": {},
        }
        print(f"{case['name']}: selections ready; {per_case[case['name']]['diagnostics']}", flush=True)

    # Seed-major: if the run is stopped early, every subset has its first seeds.
    jobs = [(seed, case, name) for seed in args.seeds for case in cases for name in per_case[case["name"]]["subsets"]]
    for index, (seed, case, name) in enumerate(jobs):
        info = per_case[case["name"]]
        mask = info["subsets"][name]
        result = run_training(args, case, name, mask, seed, spec, info["tensors"], info["configs"], heldout_dir)
        if result is None:  # --cached_only: not trained yet
            continue
        info["results"].setdefault(name, {})[seed] = result
        print(
            f"[{index + 1}/{len(jobs)}] {case['name']} {name} seed {seed}: top-1 {result['top1']:.4f} "
            f"({result['num_train_rows']} rows, {result['steps']} steps, {result['seconds']} s)",
            flush=True,
        )

    rows = summarize(args, cases, per_case)
    runtime = time.perf_counter() - started
    timing = read_json(work_dir / "timing.json") or {}
    train_seconds = sum(
        r["seconds"] for info in per_case.values() for s in info["results"].values() for r in s.values()
    )
    budget_line = f"{spec.steps} steps" if spec.steps else f"{spec.epochs} epochs"
    title = (
        f"CIFAR-10, pool {args.pool_size:,}, {args.train_model} from scratch, {budget_line} x batch "
        f"{spec.batch_size}, seeds {', '.join(map(str, args.seeds))} ({args.trainer} trainer), "
        f"hf_clipsel {commit}"
    )
    text = markdown(args, cases, per_case, rows, model_line)
    prefix = Path(args.results_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(str(prefix) + ".md").write_text(f"{title}\n\n{text}\ncommand: `{command}`\n")
    plot(args, cases, per_case, rows, Path(str(prefix) + ".png"), title)
    write_json(
        work_dir / "results.json",
        {
            "command": command,
            "model": model,
            "zero_shot_top1": zero_shot,
            "rows": rows,
            "diagnostics": {name: info["diagnostics"] for name, info in per_case.items()},
            "timing": timing,
            "this_invocation_seconds": round(runtime, 1),
            "training_seconds_total": round(train_seconds, 1),
        },
    )
    print("\n" + title + "\n\n" + text)
    print(f"pieces (first run of each, s): {json.dumps(timing)}")
    print(f"training runs: {len(jobs)}, {train_seconds / 60:.1f} min in total")
    print(f"this invocation: {runtime / 60:.1f} min; outputs: {prefix}.md, {prefix}.png, {work_dir / 'results.json'}")


if __name__ == "__main__":
    main()
