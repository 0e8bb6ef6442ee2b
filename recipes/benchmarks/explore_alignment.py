"""Exploration, not a package feature: which zero-shot score separates the injected rows best?

Reads the cache of a finished `bench_quality.py` run (--work_dir; its SAS zero-shot selections and embedding caches)
and, per noise case, prints the share of injected rows kept at each ratio by the top-k of:
- zero-shot SAS (cosine to the given label's prompt; what `clip_score` / SAS zero-shot select by);
- SAS + the gated diversity term (the package default's reward with zero-shot features);
- p(label | image): the zero-shot class posterior, softmax over the class prompts at half the logit scale;
- min-max(SAS) + min-max(posterior), + the gated diversity term;
and each score's AUROC against the injected rows (0.5 = chance). No training: kept-noise only.

    python recipes/benchmarks/bench_quality.py --asymmetric 0.3 --corruption 0.05   # first, to fill the cache
    python recipes/benchmarks/explore_alignment.py                                  # under a minute on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from hf_clipsel import pipeline, scoring
from hf_clipsel.context import load_context, prompts_of
from hf_clipsel.embedding import embed_class_prompts, pooled_matrix
from hf_clipsel.modeling import class_text_features, image_features, logit_scale
from hf_clipsel.parser import parse_config

RATIOS = (0.3, 0.5, 0.8)


def kept_share(score: np.ndarray, injected: np.ndarray, ratio: float) -> float:
    """Share of injected rows among the top floor(ratio * N) rows by score (ties by row position)."""
    order = np.lexsort((np.arange(len(score)), -score))
    return float(injected[order[: int(ratio * len(score))]].mean())


def normalized(x) -> np.ndarray:
    return scoring.min_max(torch.as_tensor(x)).double().numpy()


def case_scores(run_dir: Path, pool_file: Path, knn_k: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    config = parse_config(["--config", str(run_dir / "sas_zero_shot" / "run_config.yaml")])
    context = load_context(config)
    embeddings = pipeline.embed_stage(context)  # the case's embedding cache: nothing is encoded again
    with torch.no_grad():
        features = image_features(context.model, pooled_matrix(embeddings))
        text_pooled = embed_class_prompts(context.model, context.processor.tokenizer, prompts_of(context))
        cosine = F.normalize(features, dim=-1) @ class_text_features(context.model, text_pooled).T
    table = pq.read_table(pool_file, columns=["label", "is_noisy"]).to_pydict()
    labels, injected = torch.tensor(table["label"]), np.asarray(table["is_noisy"], dtype=bool)
    rows = torch.arange(len(labels))
    sas = cosine[rows, labels].numpy()
    posterior = torch.softmax(0.5 * logit_scale(context.model) * cosine, dim=-1)[rows, labels].numpy()
    agrees = (cosine.argmax(dim=-1) == labels).numpy()
    diversity = normalized(scoring.sample_diversity(features, labels, knn_k).numpy())  # as the package: unnormalised

    def gated(alignment):
        alignment = normalized(alignment)
        return alignment / alignment.mean() + 0.1 * agrees * diversity / diversity.mean()

    blend = normalized(sas) + normalized(posterior)
    return {
        "zero-shot SAS": sas,
        "SAS + gated diversity (default reward)": gated(sas),
        "posterior of the given label": posterior,
        "SAS + posterior + gated diversity": gated(blend),
    }, injected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/quality/work", help="bench_quality.py's --work_dir.")
    parser.add_argument("--knn_k", type=int, default=100)
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    for model_dir in sorted((work_dir / "runs").iterdir()):
        for case_dir in sorted(model_dir.iterdir()):
            for run_dir in sorted(case_dir.iterdir()):
                pool_file = next((work_dir / "pools" / case_dir.name / "pool").glob("*.parquet"))
                scores, injected = case_scores(run_dir, pool_file, args.knn_k)
                print(f"\n{case_dir.name}: {injected.mean():.1%} injected")
                print("| score | " + " | ".join(f"kept at {r}" for r in RATIOS) + " | AUROC |")
                print("|---|" + "---|" * (len(RATIOS) + 1))
                for name, score in scores.items():
                    shares = " | ".join(f"{kept_share(score, injected, r):.1%}" for r in RATIOS)
                    print(f"| {name} | {shares} | {roc_auc_score(injected, -score):.3f} |")


if __name__ == "__main__":
    main()
