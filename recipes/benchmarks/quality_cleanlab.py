"""cleanlab as a label-noise baseline for bench_quality.py: its label-quality ranking of the selection CLIP's own
zero-shot class probabilities.

cleanlab (https://github.com/cleanlab/cleanlab) ranks rows by how likely their given label is wrong, from any
model's out-of-sample class probabilities (``pred_probs``). Here ``pred_probs`` are the zero-shot probabilities of
the same CLIP the method selects with (the method run's model: its adapters where the held-out check kept them,
else zero-shot), softmax over the class prompts of ``logit_scale * cosine`` at the model's full logit scale; a
subset at ratio r keeps the floor(r * N) rows with the best ``cleanlab.rank.get_label_quality_scores``
(self-confidence: the probability of the given label), ties by row position.

cleanlab is an optional dependency of the benchmarks only: ``pip install cleanlab`` (or ``.[bench]``).
"""

from __future__ import annotations

import numpy as np
import torch

from hf_clipsel import scoring
from hf_clipsel.adaptation import scoring_embeddings, trained_model
from hf_clipsel.configs import ClipselConfig, budget
from hf_clipsel.context import load_context, prompts_of, valid_rows
from hf_clipsel.embedding import embed_class_prompts, embed_stage, pooled_matrix
from hf_clipsel.modeling import class_text_features, image_features, logit_scale

QUALITY_METHOD = "self_confidence"


def zero_shot_probabilities(config: ClipselConfig, saved_alignment: np.ndarray | None = None):
    """The class probabilities of the run of ``config`` (the method's), on its embedding cache.

    Args:
        config: a finished `pipeline.run` configuration; its model (adapters or fallback) gives the features.
        saved_alignment: optional ``[N]`` semantic_alignment of that run's scores, checked equal to the cosine at the
            given label recomputed here (the same features as the run's).

    Returns:
        ``(pred_probs, labels, valid)``: float64 ``[N, C]`` rows summing to 1 (softmax of logit_scale * cosine),
        int64 ``[N]`` given labels, bool ``[N]`` rows the run could score.
    """
    context = load_context(config)
    embeddings = embed_stage(context)  # the run's embedding cache: nothing is encoded again
    model = trained_model(context)
    embeddings = scoring_embeddings(context, model, embeddings)
    labels = torch.from_numpy(context.source.labels).clamp(min=0)
    with torch.no_grad():
        features = image_features(model, pooled_matrix(embeddings)).cpu()
        text = embed_class_prompts(model, context.processor.tokenizer, prompts_of(context))
        class_features = class_text_features(model, text).cpu()
    # The cosine to every class prompt, through the package's own alignment score with each class as the label.
    cosine = torch.stack(
        [
            scoring.semantic_alignment(features, class_features, torch.full_like(labels, c))
            for c in range(class_features.shape[0])
        ],
        dim=1,
    )
    valid = valid_rows(context, embeddings)
    if saved_alignment is not None:
        given = cosine.gather(1, labels[:, None]).squeeze(1).numpy()
        if not np.allclose(given[valid], np.asarray(saved_alignment)[valid], atol=1e-5):
            raise RuntimeError("the recomputed cosine at the given label differs from the run's semantic_alignment.")
    pred_probs = torch.softmax(logit_scale(model) * cosine.to(torch.float64), dim=1).numpy()
    return pred_probs, labels.numpy().astype(np.int64), valid


def label_quality(pred_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """cleanlab's label-quality score of each row (higher: more likely right), ``[N]`` in ``[0, 1]``."""
    from cleanlab.rank import get_label_quality_scores

    return get_label_quality_scores(labels, pred_probs, method=QUALITY_METHOD)


def top_rows(score: np.ndarray, ratios, valid: np.ndarray | None = None) -> dict[float, np.ndarray]:
    """{ratio: bool[N]}: the floor(ratio * N) valid rows of highest ``score`` (ties by row position)."""
    score = np.where(np.ones(len(score), bool) if valid is None else valid, score, -np.inf)
    order = np.lexsort((np.arange(len(score)), -score))
    masks = {}
    for ratio in ratios:
        mask = np.zeros(len(score), dtype=bool)
        mask[order[: budget(ratio, len(score))]] = True
        masks[ratio] = mask
    return masks


def cleanlab_masks(config: ClipselConfig, ratios, saved_alignment=None) -> dict[float, np.ndarray]:
    """The cleanlab baseline's kept rows per ratio, from the run of ``config``'s probabilities."""
    pred_probs, labels, valid = zero_shot_probabilities(config, saved_alignment)
    return top_rows(label_quality(pred_probs, labels), ratios, valid)
