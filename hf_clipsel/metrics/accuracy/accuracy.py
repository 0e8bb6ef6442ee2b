"""Top-k accuracy: an `evaluate` metric module, loadable offline by path.

Same shape as the Hub's `accuracy` module (`compute(predictions=..., references=...)` returns `accuracy`), plus
top-k: `predictions` may be class ids (top-1 only) or one row of per-class scores per example (logits,
probabilities, any monotone score), and `top_k` lists the k to report.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of examples whose reference class is among the k highest-scoring classes.
Top-1 accuracy is the usual accuracy. Value range [0, 1], higher is better.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or `list` of `list` of `float`): predicted class ids, or per-class scores
        (one row of C scores per example, e.g. logits). Class ids only allow `top_k=(1,)`.
    references (`list` of `int`): reference class ids in [0, C).
    top_k (`int` or `tuple` of `int`, default `(1,)`): the k to report. A k >= C gives 1.0, since every class is
        then in the top k.
    normalize (`bool`, default `True`): if False, return the number of correct examples instead of the fraction.
    sample_weight (`list` of `float`, optional): per-example weights.

Ties between scores are broken towards the lower class id, as `numpy.argmax` does, so a model whose scores are
all equal gets no credit it did not earn.

Returns:
    accuracy (`float`): top-1 accuracy (the Hub `accuracy` module's key), present when 1 is in `top_k`.
    top{k} (`float`): top-k accuracy for each requested k, e.g. `top1`, `top5`.

Examples:
    >>> metric = hf_clipsel.metrics.load_accuracy_metric()
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[2, 0], top_k=(1, 2))
    {'accuracy': 0.5, 'top1': 0.5, 'top2': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate tries each feature set in order and keeps the first that encodes the first example.
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features(
                    {"predictions": datasets.List(datasets.Value("float64")), "references": datasets.Value("int64")}
                ),
            ],
        )

    def _compute(self, predictions, references, top_k=(1,), normalize=True, sample_weight=None):
        ks = (top_k,) if isinstance(top_k, int) else tuple(top_k)
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"top_k must hold integers >= 1, got {top_k!r}.")
        references = np.asarray(references, dtype=np.int64)
        predictions = np.asarray(predictions)
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if predictions.ndim == 1:
            if any(k != 1 for k in ks):
                raise ValueError("Top-k with k > 1 needs per-class scores; class ids only give top-1.")
            ranks = np.where(predictions == references, 0, 1)
        else:
            num_classes = predictions.shape[1]
            if references.size and (references.min() < 0 or references.max() >= num_classes):
                raise ValueError(f"references must be class ids in [0, {num_classes}).")
            true_score = predictions[np.arange(len(references)), references][:, None]
            lower_id = np.arange(num_classes)[None, :] < references[:, None]
            # Rank of the reference class under a stable descending sort: classes scoring higher, plus tied
            # classes with a lower id (argmax's tie-break).
            ranks = (predictions > true_score).sum(1) + ((predictions == true_score) & lower_id).sum(1)
        results = {}
        for k in ks:
            correct = float(((ranks < int(k)) * weights).sum())
            results[f"top{int(k)}"] = correct / float(weights.sum()) if normalize and weights.sum() else correct
        if "top1" in results:
            results = {"accuracy": results["top1"], **results}
        return results
