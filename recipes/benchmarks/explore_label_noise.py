"""Which ranking of the same CLIP keeps the least label noise: the default's reward against cleanlab's and variants
(selections only, no training).

Reads the cache of a finished `bench_quality.py` run (--work_dir): for each case, the method run's scores table
(its SAS~, SDS~, gate, damage flags: the package's own columns) and the run's class probabilities at the model's
full logit scale (quality_cleanlab.zero_shot_probabilities). Each candidate is ranked with the package's reward code
(hf_clipsel.selection.SelectionInputs: min-max, scale by mean, the gate, damaged rows last) given another alignment
term, and the share of injected rows among the top floor(r * N) is printed per case and ratio, with the number of
cells where it kept more than cleanlab's ranking (damaged-image case: damaged rows kept). Names: P@f, the posterior
at f times the logit scale (P@1: the probabilities cleanlab ranks); SAS+P, min-max(SAS~ + P~); "gated div", plus
0.1 times the gated diversity term (else alpha 0); thr, damage_threshold (None: no damage check). "sigmoid P": the
family link ``sigmoid`` of hf_clipsel.scoring.class_posterior, sigmoid(logit_scale * cosine + logit_bias) at the given
label, against the ``softmax`` link (P@0.5, the package's): the measurement behind SigLIP's posterior
(recipes/benchmarks/README.md, "Other families: a SigLIP proxy"); "SAS + gated div": no posterior term. "unless
agreed" / "unless sure": the damage check demotes a flagged row only where CLIP doubts its label too (its class is
not the label; or that, or its posterior below its class's median). P@fit: the temperature fitted to the given labels
under symmetric noise (printed per pool). "kNN k": the share of a row's k nearest neighbours (cosine on the image
features the run scored with, every valid row of the pool, itself left out) that carry its given label, a second
label-noise signal beside CLIP's probabilities ("deep kNN"); "P@f + w kNN k": (1 - w) min-max(P@f) + w min-max(kNN k)
as the alignment term (w 0.5: their mean), "P@f x kNN k": their product, "kNN k/class": the agreement over its
class's mean agreement (as confident learning's per-class thresholds) (``--knn`` picks k, empty: none). "thr 3.5
mirror q": the damage check with damage_false_discovery q (a tail flagged only beyond its mirror); "+ a gated div":
the gated diversity term at weight a; "P@1 alone, no damage check, demoting ...": cleanlab's ranking with only the
duplicate check's demotions (copies of a group and label, copies under several labels, or those but the best copy).

Several noise draws (bench_quality.py --noise_seed, one run each in the same --work_dir): every draw found is ranked,
the first table gives each cell's mean over the draws, the second the mean difference to cleanlab's ranking of the
same draw, in points, with its standard error and the number of draws above it.

    for seed in 0 1 2 3 4; do python recipes/benchmarks/bench_quality.py --noise_levels 0.2 0.4 --asymmetric 0.3 \
        --corruption 0.05 --selectors exact --variants --no_references --cached_only --noise_seed $seed \
        --work_dir /tmp/quality/work --results_prefix /tmp/quality/draw$seed; done
    python recipes/benchmarks/explore_label_noise.py --work_dir /tmp/quality/work
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from cleanlab.rank import get_label_quality_scores
from quality_cleanlab import label_quality, top_rows, zero_shot_probabilities
from scipy.optimize import minimize
from sklearn.neighbors import NearestNeighbors

from hf_clipsel import scoring
from hf_clipsel.adaptation import scoring_embeddings, trained_model
from hf_clipsel.context import load_context, valid_rows
from hf_clipsel.embedding import embed_stage, pooled_matrix
from hf_clipsel.modeling import image_features, load_model, logit_bias, logit_scale
from hf_clipsel.parser import parse_config
from hf_clipsel.runs.load import read_scores
from hf_clipsel.scores_table import score_flags
from hf_clipsel.scoring import min_max
from hf_clipsel.selection import SelectionInputs

RATIOS = (0.3, 0.5, 0.8)
THRESHOLDS = (3.0, 3.5, 4.0, 4.5, None)
FRACTIONS = (0.5, 0.75, 1.0, 1.25)
KNN_THRESHOLDS = (3.5, 4.0, None)
MIRROR_SHARES = (0.1, 0.25, 0.5)
KNN_WEIGHTS = (0.03, 0.1, 0.25, 0.5)


def candidates(
    table: dict,
    pred_probs: np.ndarray,
    labels: np.ndarray,
    selection,
    sigmoid_posterior: torch.Tensor,
    agreement: dict[int, np.ndarray],
) -> dict[str, np.ndarray]:
    """{name: score [N], higher kept first}. ``sigmoid_posterior``: the sigmoid link's class posterior [N];
    ``agreement``: {k: kNN label agreement [N]} (:func:`knn_label_agreement`)."""
    rows = np.arange(len(labels))

    def flagged(threshold: float, share: float | None) -> np.ndarray:
        """Rows any registered score flags with the damage check at ``threshold`` and damage_false_discovery
        ``share`` (the run's other selection settings: its duplicate check)."""
        check = dataclasses.replace(
            selection, damage_check=True, damage_threshold=threshold, damage_false_discovery=share
        )
        return np.any([v != "" for v in score_flags(table, check).values()], axis=0)

    demoted = {threshold: flagged(threshold, None) for threshold in THRESHOLDS if threshold}
    # The mirror check (damage_false_discovery q): a tail flagged only beyond its mirror, cut at 3.5 or above.
    demoted |= {f"3.5 mirror q{q:g}": flagged(3.5, q) for q in MIRROR_SHARES}
    demoted[None] = None
    gate = table["predicted_label"] == table["label"]
    num_classes = pred_probs.shape[1]
    thresholds = np.array([pred_probs[labels == j, j].mean() for j in range(num_classes)])[labels]
    logits = np.log(pred_probs)  # log-softmax: the logits up to a per-row constant

    def at(fraction: float) -> torch.Tensor:
        tempered = np.exp(fraction * (logits - logits.max(axis=1, keepdims=True)))
        return torch.from_numpy((tempered / tempered.sum(axis=1, keepdims=True))[rows, labels])

    def below_class_median(posterior: torch.Tensor) -> np.ndarray:
        p = posterior.numpy()
        medians = np.array([np.median(p[labels == j]) if (labels == j).any() else 0.0 for j in range(num_classes)])
        return p < medians[labels]

    def reward(posterior, alpha=0.1, sas=1.0, gated=True, threshold=3.0, demote=None):
        """``demote``: bool [N] rows demoted instead of every row the damage check flags at ``threshold``."""
        inputs = SelectionInputs(
            row_id=rows,
            labels=labels,
            semantic_alignment_normalized=sas * table["semantic_alignment_normalized"],
            sample_diversity_normalized=table["sample_diversity_normalized"],
            diversity_gate=gate if gated else None,
            class_posterior_normalized=None if posterior is None else min_max(posterior).numpy(),
            demoted=demoted[threshold] if demote is None else demote,
        )
        return inputs.reward(alpha)

    saved_reward = next((c for c in table if c.startswith("reward_")), None)  # none where the run ranked by SAS
    out = {} if saved_reward is None else {"the run's saved reward (its settings)": np.asarray(table[saved_reward])}
    out |= {
        "previous default (SAS+P@0.5 + gated div, thr 3.0)": reward(at(0.5)),
        "cleanlab self_confidence": label_quality(pred_probs, labels),
        "cleanlab normalized_margin": get_label_quality_scores(labels, pred_probs, method="normalized_margin"),
        # confident learning's per-class threshold: the mean probability of class j over the rows labelled j
        "P@1/threshold + gated div, thr 3.0": reward(
            torch.from_numpy(np.minimum(at(1.0).numpy() / thresholds, 10.0)), sas=0.0
        ),
    }
    for threshold in THRESHOLDS:
        for fraction in FRACTIONS:
            p = at(fraction)
            out[f"P@{fraction:g} alone, damage thr {threshold}"] = reward(p, alpha=0.0, sas=0.0, threshold=threshold)
            out[f"P@{fraction:g} + gated div, thr {threshold}"] = reward(p, sas=0.0, threshold=threshold)
            out[f"SAS+P@{fraction:g} alone, thr {threshold}"] = reward(p, alpha=0.0, threshold=threshold)
        out[f"SAS+P@0.5 + gated div, thr {threshold}"] = reward(at(0.5), threshold=threshold)
        out[f"0.5 SAS+P@0.5 + gated div, thr {threshold}"] = reward(at(0.5), sas=0.5, threshold=threshold)
    for threshold in [f"3.5 mirror q{q:g}" for q in MIRROR_SHARES]:
        for fraction in (0.5, 0.9, 1.0):
            p = at(fraction)
            out[f"P@{fraction:g} alone, thr {threshold}"] = reward(p, alpha=0.0, sas=0.0, threshold=threshold)
            for alpha in (0.01, 0.03, 0.1):
                out[f"P@{fraction:g} + {alpha:g} gated div, thr {threshold}"] = reward(
                    p, alpha=alpha, sas=0.0, threshold=threshold
                )
    for alpha in (0.01, 0.03):
        out[f"P@1 + {alpha:g} gated div, thr None"] = reward(at(1.0), alpha=alpha, sas=0.0, threshold=None)
    # What the duplicate check's demotions cost (no damage check; cleanlab's ranking otherwise): copies of a group and
    # label but its best ("dup"), every copy of an image under several labels ("conf"), or those but the copy with
    # the best P@1 ("conf keep best", much as the score's KEEP_PREFERRED_LABEL would keep its preferred label's).
    if "duplicate" in table and "conflicting_labels" in table:
        duplicate, conflict = np.asarray(table["duplicate"]) != "", np.asarray(table["conflicting_labels"]) != ""
        group, p1 = np.asarray(table["duplicate_group"]), at(1.0).numpy()
        conflict_but_best = conflict.copy()
        for g in np.unique(group[conflict]):
            members = np.flatnonzero((group == g) & conflict)
            conflict_but_best[members[np.argmax(p1[members])]] = False
        demotions = {"dup": duplicate, "conf": conflict, "dup + conf": duplicate | conflict}
        demotions |= {"conf keep best": conflict_but_best, "dup + conf keep best": duplicate | conflict_but_best}
        for how, demote in demotions.items():
            out[f"P@1 alone, no damage check, demoting {how}"] = reward(at(1.0), alpha=0.0, sas=0.0, demote=demote)
    # The damage check demotes a flagged row only where CLIP doubts its label too: undamaged rows flagged by chance
    # that CLIP is sure about keep their place. "unless agreed": demoted unless the label is CLIP's class; "unless
    # sure": demoted unless that and its posterior at least its class's median.
    for threshold in (3.0, 3.5, 4.0):
        for fraction in (0.5, 0.75, 1.0):
            p = at(fraction)
            out[f"P@{fraction:g} + gated div, thr {threshold} unless agreed"] = reward(
                p, sas=0.0, demote=demoted[threshold] & ~gate
            )
            out[f"P@{fraction:g} + gated div, thr {threshold} unless sure"] = reward(
                p, sas=0.0, demote=demoted[threshold] & (~gate | below_class_median(p))
            )
            out[f"P@{fraction:g} alone, thr {threshold} unless agreed"] = reward(
                p, alpha=0.0, sas=0.0, demote=demoted[threshold] & ~gate
            )

    # The temperature fitted to the given labels under symmetric noise: maximise the mean log-likelihood of
    # (1 - eta) P@f + eta / (C - 1) (1 - P@f) over f and eta. Under symmetric noise the chance that a label is right
    # rises with the calibrated posterior, so that ranking is the Bayes ranking at every ratio.
    def nll(params):
        q = at(params[0]).numpy()
        return -np.log((1 - params[1]) * q + params[1] / (num_classes - 1) * (1 - q) + 1e-12).mean()

    fit = minimize(nll, x0=[0.75, 0.2], bounds=[(0.05, 4.0), (0.0, 0.95)], method="L-BFGS-B")
    print(f"fitted temperature: f = {fit.x[0]:.3f}, eta = {fit.x[1]:.3f}")
    for threshold in (3.5, 4.0, None):
        out[f"P@fit alone, thr {threshold}"] = reward(at(fit.x[0]), alpha=0.0, sas=0.0, threshold=threshold)
        out[f"P@fit + gated div, thr {threshold}"] = reward(at(fit.x[0]), sas=0.0, threshold=threshold)
        out[f"P@1.5 alone, thr {threshold}"] = reward(at(1.5), alpha=0.0, sas=0.0, threshold=threshold)
        out[f"P@0.9 alone, thr {threshold}"] = reward(at(0.9), alpha=0.0, sas=0.0, threshold=threshold)
        out[f"P@0.9 + gated div, thr {threshold}"] = reward(at(0.9), sas=0.0, threshold=threshold)
    # The kNN label agreement, alone and with the posterior (both min-max scaled, as the reward scales its terms).
    for k, share in agreement.items():
        a = min_max(torch.from_numpy(share))
        # Per class, as confident learning thresholds: agreement over its class's mean agreement.
        class_mean = np.array([share[labels == j].mean() if (labels == j).any() else 1.0 for j in range(num_classes)])
        a_class = min_max(torch.from_numpy(share / np.maximum(class_mean[labels], 1e-12)))
        for threshold in KNN_THRESHOLDS:
            out[f"kNN {k} alone, thr {threshold}"] = reward(a, alpha=0.0, sas=0.0, threshold=threshold)
            for fraction in (0.5, 0.9):
                p = min_max(at(fraction))
                mixed = {f"+ {w:g} kNN": (1 - w) * p + w * a for w in KNN_WEIGHTS} | {"x kNN": p * a}
                mixed |= {f"+ {w:g} kNN/class": (1 - w) * p + w * a_class for w in KNN_WEIGHTS[:2]}
                for how, combined in mixed.items():
                    name = f"P@{fraction:g} {how} {k}"
                    out[f"{name} alone, thr {threshold}"] = reward(combined, alpha=0.0, sas=0.0, threshold=threshold)
                    out[f"{name} + gated div, thr {threshold}"] = reward(combined, sas=0.0, threshold=threshold)
    default = selection.damage_threshold
    out[f"sigmoid P alone, thr {default}"] = reward(sigmoid_posterior, alpha=0.0, sas=0.0, threshold=default)
    out[f"sigmoid P + gated div, thr {default}"] = reward(sigmoid_posterior, sas=0.0, threshold=default)
    out[f"SAS + gated div, thr {default}"] = reward(None, threshold=default)
    saved = np.asarray(table["class_posterior"])
    gap = np.abs(at(0.5).numpy() - saved).max()
    print(f"softmax link P@0.5 here vs the run's class_posterior: max |difference| {gap:.2e}")
    print("flagged rows per check:", {t: int(d.sum()) for t, d in demoted.items() if d is not None})
    print(
        "of which CLIP's class is not the label:",
        {t: int((d & ~gate).sum()) for t, d in demoted.items() if d is not None},
    )
    return out


def sigmoid_link_posterior(config, cosine_at_label: np.ndarray) -> torch.Tensor:
    """hf_clipsel.scoring.class_posterior's ``sigmoid`` link from the run's saved cosine at the given label
    (semantic_alignment, which zero_shot_probabilities checked against the run's own features) and the model's
    logit scale and bias (adapters do not change them)."""
    model, _ = load_model(config.model)
    logits = logit_scale(model) * torch.from_numpy(np.asarray(cosine_at_label, dtype=np.float32))
    return torch.sigmoid(logits + logit_bias(model))


def knn_label_agreement(config, table: dict, ks) -> dict[int, np.ndarray]:
    """{k: [N] share of each row's k nearest neighbours (cosine, among the valid rows, itself left out) whose given
    label is its own}; invalid rows get 0. The image features are the run's: its embedding cache through the model
    it scored with (saved adapters or zero-shot), checked by recomputing the run's sample_diversity from them."""
    if not ks:
        return {}
    context = load_context(config)
    embeddings = embed_stage(context)  # the run's embedding cache: nothing is encoded again
    model = trained_model(context)
    embeddings = scoring_embeddings(context, model, embeddings)
    with torch.no_grad():
        features = image_features(model, pooled_matrix(embeddings)).cpu()
    valid = valid_rows(context, embeddings)
    labels = np.clip(np.asarray(context.source.labels, dtype=np.int64), 0, None)
    again = scoring.sample_diversity(features, torch.from_numpy(labels), config.scoring.knn_k, torch.from_numpy(valid))
    if not np.allclose(again.numpy(), np.asarray(table["sample_diversity"]), atol=1e-4):
        raise RuntimeError("the recomputed features give another sample_diversity than the run's.")
    rows = np.flatnonzero(valid)
    search = NearestNeighbors(n_neighbors=max(ks), metric="cosine", algorithm="brute").fit(features[rows].numpy())
    _, index = search.kneighbors()  # no query given: each row's neighbours without itself
    same = labels[rows][index] == labels[rows][:, None]
    out = {}
    for k in ks:
        out[k] = np.zeros(len(labels))
        out[k][rows] = same[:, :k].mean(axis=1)
    return out


def standard_error(values: np.ndarray) -> float:
    """The standard error of the mean of ``values`` (nan for a single draw)."""
    return values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")


def case_and_draw(case_dir: Path) -> tuple[str, int]:
    """(case name, noise seed) of a bench_quality.py pool key, e.g. ``sym0.4-pool10000-seed0-noiseseed3``."""
    return case_dir.name.split("-")[0], int(case_dir.name.rpartition("-noiseseed")[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/quality/work")
    parser.add_argument(
        "--run",
        default="exact",
        help="Whose scores to rank: a selector's run folder, e.g. sas_zero_shot (the zero-shot features: what the "
        "default would keep had the adapter check fallen back).",
    )
    parser.add_argument(
        "--noise_seeds",
        type=int,
        nargs="*",
        default=None,
        help="The noise draws to rank (bench_quality.py --noise_seed, one run each); default: every draw the "
        "work_dir holds. With several, each cell is the mean over the draws and the second table gives the mean "
        "difference to cleanlab's with its standard error.",
    )
    parser.add_argument(
        "--knn",
        type=int,
        nargs="*",
        default=[10, 25, 50, 100],
        help="Neighbour counts k of the kNN label-agreement candidates (none: skip them and the feature pass).",
    )
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    kept = {}  # {candidate: {case: {draw: [kept share per ratio]}}}
    for model_dir in sorted((work_dir / "runs").iterdir()):
        for case_dir in sorted(model_dir.iterdir()):
            case, draw = case_and_draw(case_dir)
            if args.noise_seeds is not None and draw not in args.noise_seeds:
                continue
            run_dir = next(case_dir.iterdir())
            pool_file = next((work_dir / "pools" / case_dir.name / "pool").glob("*.parquet"))
            noisy = np.asarray(pq.read_table(pool_file, columns=["is_noisy"]).column(0).to_pylist(), dtype=bool)
            if not (run_dir / args.run / "run_record.json").exists() or not noisy.any():
                continue
            config = parse_config(["--config", str(run_dir / args.run / "run_config.yaml")])
            table = read_scores(run_dir / args.run).with_format("numpy")[:]
            pred_probs, labels, _ = zero_shot_probabilities(config, table["semantic_alignment"])
            print(f"\n{model_dir.name} {case_dir.name}: {noisy.mean():.1%} injected")
            sigmoid_posterior = sigmoid_link_posterior(config, table["semantic_alignment"])
            agreement = knn_label_agreement(config, table, args.knn)
            for k, share in agreement.items():
                untouched, injected = share[~noisy].mean(), share[noisy].mean()
                print(f"kNN {k} agreement: mean {untouched:.3f} on untouched rows, {injected:.3f} on injected")
            ranked = candidates(table, pred_probs, labels, config.selection, sigmoid_posterior, agreement)
            for name, score in ranked.items():
                masks = top_rows(score, RATIOS)
                kept.setdefault(name, {}).setdefault(case, {})[draw] = [noisy[masks[r]].mean() for r in RATIOS]
    reference = kept["cleanlab self_confidence"]
    cases = list(reference)
    draws = {case: sorted(reference[case]) for case in cases}
    print("\nnoise draws per case:", {case: draws[case] for case in cases})

    def differences(name) -> list[np.ndarray]:
        """Per case and ratio: [draws] kept share minus cleanlab's (points), for the draws both have."""
        return [
            100 * np.array([kept[name][c][d][i] - reference[c][d][i] for d in draws[c] if d in kept[name][c]])
            for c in cases
            for i in range(len(RATIOS))
        ]

    def above(name) -> int:
        return sum(diff.mean() > 0 for diff in differences(name))

    header = " | ".join(f"{c} {r}" for c in cases for r in RATIOS)
    print(f"\nmean kept share over the draws\n\n| ranking | {header} | cells above cleanlab (mean) |")
    print("|---|" + "---|" * (len(cases) * len(RATIOS) + 1))
    for name in sorted(kept, key=above):
        means = [np.mean([kept[name][c][d][i] for d in kept[name][c]]) for c in cases for i in range(len(RATIOS))]
        print(f"| {name} | {' | '.join(f'{m:.2%}' for m in means)} | {above(name)} |")
    print(
        "\nkept share minus cleanlab's, points: mean ± standard error over the draws (draws above cleanlab)\n\n"
        f"| ranking | {header} | cells above (mean) | draw-cells above |"
    )
    print("|---|" + "---|" * (len(cases) * len(RATIOS) + 2))
    for name in sorted(kept, key=above):
        diffs = differences(name)
        cells = " | ".join(f"{d.mean():+.2f} ± {standard_error(d):.2f} ({(d > 0).sum()})" for d in diffs)
        print(f"| {name} | {cells} | {above(name)} | {sum(int((d > 0).sum()) for d in diffs)} |")


if __name__ == "__main__":
    main()
