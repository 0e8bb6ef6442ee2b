"""Which zero-shot alignment term separates mislabelled rows best, over several noise draws? (No training.)

Reads the cache of a finished `bench_quality.py` run (--work_dir: its pools and their zero-shot embedding caches).
For each label-noise case (symmetric or asymmetric), label noise is drawn again on the same images with noise seeds
0..D-1 (seed 0 is the benchmark's own pool), and for each draw it counts the share of mislabelled rows kept at
each ratio by the top-k of:
- zero-shot SAS (cosine to the given label's prompt; what `clip_score` / SAS zero-shot select by);
- SAS + the gated diversity term (the reward with `alignment sas`, zero-shot features);
- p(label | image): the zero-shot class posterior, softmax over the class prompts at half the logit scale;
- min-max(SAS~ + posterior~) + the gated diversity term (the reward with `alignment sas+posterior`, the default).
It prints the mean over the draws, each score's AUROC against the mislabelled rows (0.5 = chance), and in how many
draws each score kept strictly less noise than SAS at each ratio.

    python recipes/benchmarks/bench_quality.py --asymmetric 0.3 --corruption 0.05   # first, to fill the cache
    python recipes/benchmarks/explore_alignment.py --noise_draws 6                  # about a minute
    python recipes/benchmarks/explore_alignment.py --posterior_fractions 0.25 1     # other temperatures too
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features
from sklearn.metrics import roc_auc_score

from hf_clipsel import scoring
from hf_clipsel.benchmarking.noise import asymmetric_label_noise, symmetric_label_noise
from hf_clipsel.context import load_context, prompts_of
from hf_clipsel.embedding import embed_class_prompts, embed_stage, pooled_matrix
from hf_clipsel.modeling import class_text_features, image_features, logit_scale
from hf_clipsel.parser import parse_config
from hf_clipsel.selection import SelectionInputs

RATIOS = (0.3, 0.5, 0.8)
NOISE = {"sym": ("symmetric", symmetric_label_noise), "asym": ("asymmetric", asymmetric_label_noise)}


def kept_share(score: np.ndarray, injected: np.ndarray, ratio: float) -> float:
    """Share of injected rows among the top floor(ratio * N) rows by score (ties by row position)."""
    order = np.lexsort((np.arange(len(score)), -score))
    return float(injected[order[: int(ratio * len(score))]].mean())


def zero_shot_features(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor, float, list[str]]:
    """(image features [N, d], cosine to each class prompt [N, C], logit scale, class names) of a case's pool."""
    context = load_context(parse_config(["--config", str(run_dir / "sas_zero_shot" / "run_config.yaml")]))
    embeddings = embed_stage(context)  # the case's embedding cache: nothing is encoded again
    with torch.no_grad():
        features = image_features(context.model, pooled_matrix(embeddings))
        text_pooled = embed_class_prompts(context.model, context.processor.tokenizer, prompts_of(context))
        cosine = F.normalize(features, dim=-1) @ class_text_features(context.model, text_pooled).T
    return features, cosine, logit_scale(context.model), context.source.class_names


def scores_for(
    features, cosine, scale: float, labels: np.ndarray, knn_k: int, other_fractions: tuple = ()
) -> dict[str, np.ndarray]:
    """The four scores of the module docstring, for one set of given labels; the rewards come from the package's
    own SelectionInputs.reward (alpha 0.1, the agreement gate). ``other_fractions``: the default reward again with
    the posterior at these fractions of the logit scale instead of scoring.POSTERIOR_LOGIT_FRACTION."""
    labels_t = torch.from_numpy(labels)
    rows = torch.arange(len(labels))
    sas = cosine[rows, labels_t]

    def posterior_at(fraction: float) -> torch.Tensor:
        return torch.softmax(fraction * scale * cosine, dim=-1)[rows, labels_t]

    posterior = posterior_at(scoring.POSTERIOR_LOGIT_FRACTION)
    common = dict(
        row_id=np.arange(len(labels)),
        labels=labels,
        semantic_alignment_normalized=scoring.min_max(sas).numpy(),
        sample_diversity_normalized=scoring.min_max(scoring.sample_diversity(features, labels_t, knn_k)).numpy(),
        diversity_gate=(cosine.argmax(dim=-1) == labels_t).numpy(),
    )
    with_posterior = SelectionInputs(**common, class_posterior_normalized=scoring.min_max(posterior).numpy())
    scores = {
        "zero-shot SAS": sas.numpy(),
        "SAS + gated diversity (alignment sas)": SelectionInputs(**common).reward(0.1),
        "posterior of the given label": posterior.numpy(),
        "SAS + posterior + gated diversity (default)": with_posterior.reward(0.1),
    }
    for fraction in other_fractions:
        other = SelectionInputs(**common, class_posterior_normalized=scoring.min_max(posterior_at(fraction)).numpy())
        scores[f"the default with the posterior at {fraction:g} x the logit scale"] = other.reward(0.1)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/quality/work", help="bench_quality.py's --work_dir.")
    parser.add_argument("--noise_draws", type=int, default=6, help="Noise seeds 0..D-1 per case.")
    parser.add_argument("--knn_k", type=int, default=100)
    parser.add_argument(
        "--posterior_fractions", type=float, nargs="*", default=[], help="Other softmax temperatures to compare."
    )
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    for model_dir in sorted((work_dir / "runs").iterdir()):
        for case_dir in sorted(model_dir.iterdir()):
            match = re.match(r"(a?sym)(\d+)-", case_dir.name)
            if not match:
                continue  # damaged images: no label noise to redraw
            kind, fraction = match.group(1), int(match.group(2)) / 100
            run_dir = next(case_dir.iterdir())
            features, cosine, scale, class_names = zero_shot_features(run_dir)
            pool_file = next((work_dir / "pools" / case_dir.name / "pool").glob("*.parquet"))
            clean = np.asarray(pq.read_table(pool_file, columns=["clean_label"]).column(0).to_pylist())
            source = Dataset.from_dict({"label": clean}, features=Features({"label": ClassLabel(names=class_names)}))
            kept, aurocs = {}, {}
            for seed in range(args.noise_draws):
                noisy, _ = NOISE[kind][1](source, fraction, seed=seed)
                labels = np.asarray(noisy["label"], dtype=np.int64)
                injected = labels != clean
                for name, score in scores_for(
                    features, cosine, scale, labels, args.knn_k, tuple(args.posterior_fractions)
                ).items():
                    kept.setdefault(name, []).append([kept_share(score, injected, r) for r in RATIOS])
                    aurocs.setdefault(name, []).append(roc_auc_score(injected, -score))
            reference = np.array(kept["zero-shot SAS"])
            print(f"\n{case_dir.name}: {fraction:.0%} {NOISE[kind][0]} label noise, {args.noise_draws} draws")
            print(
                "| score | "
                + " | ".join(f"kept at {r}" for r in RATIOS)
                + " | AUROC | draws below SAS at "
                + "/".join(map(str, RATIOS))
                + " |"
            )
            print("|---|" + "---|" * (len(RATIOS) + 2))
            for name, shares in kept.items():
                shares = np.array(shares)
                means = " | ".join(f"{m:.2%}" for m in shares.mean(axis=0))
                wins = "/".join(str(int(w)) for w in (shares < reference).sum(axis=0))
                print(f"| {name} | {means} | {np.mean(aurocs[name]):.3f} | {wins} |")


if __name__ == "__main__":
    main()
