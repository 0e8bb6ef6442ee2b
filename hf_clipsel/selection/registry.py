"""The selector registry, the inputs every selector reads, and the helpers they share.

A selector is a plain function ``(inputs, ratios, config) -> SelectionResult``. It is registered under a name with
:func:`register_selector`, which also says what it can do (its traits: whether it needs image features, ranks rows
by the reward, supports class balance, meets the budget exactly) and which options dataclass of its own the parser
and YAML accept for it. A second registration under the same name is an error (as in PEFT), so a typo or an
import-order accident cannot silently replace a method. Other packages register selectors through the entry-point
group ``hf_clipsel.selectors`` (hf_clipsel.core.registry).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hf_clipsel.core.names import budget
from hf_clipsel.core.registry import Registry
from hf_clipsel.features import FeatureStore
from hf_clipsel.scoring import min_max, reward


def alignment_term(
    sas: np.ndarray, posterior: np.ndarray | None, valid: np.ndarray, posterior_alone: bool = False
) -> torch.Tensor:
    """The reward's alignment term before scaling (:meth:`SelectionInputs.alignment`), float32 ``[N]`` in ``[0, 1]``,
    from writable float32 ``sas`` (SAS~) and ``posterior`` (posterior~, or None) and bool ``valid``."""
    alignment = torch.from_numpy(sas)
    if posterior is None:
        return alignment
    if posterior_alone:
        return torch.from_numpy(posterior)
    return min_max(alignment + torch.from_numpy(posterior), torch.from_numpy(valid))


@dataclass
class SelectionInputs:
    """Everything a selector may read, one entry per row of the source dataset.

    Attributes:
        row_id: ``int64[N]`` stable row ids (unique); ties in every ranking are broken by row id, ascending.
        labels: ``int64[N]`` class labels.
        semantic_alignment_normalized: ``float32[N]`` SAS~ in ``[0, 1]``, higher = better aligned with the label.
        sample_diversity_normalized: ``float32[N]`` SDS~ in ``[0, 1]``, higher = sparser part of the class.
        valid: ``bool[N]`` rows that may be selected (e.g. images that decoded). Default: all rows.
        image_features: optional ``[N, d]`` features, needed by the ``moderate`` selector only: a tensor, or the score
            stage's :class:`~hf_clipsel.features.FeatureStore` (out of core); either is read as ``features[rows]``.
        diversity_gate: optional ``bool[N]``: rows that may earn the reward's diversity term (default: all).
        class_posterior_normalized: optional ``float32[N]`` in ``[0, 1]``: when given, the reward's alignment term is
            min-max(SAS~ + posterior~) instead of SAS~, or posterior~ alone with ``posterior_alone`` (see
            :meth:`alignment`).
        demoted: optional ``bool[N]``: rows (e.g. damaged images) that the reward ranks after every other valid
            row; they are selected only when the budget needs them.
    """

    row_id: np.ndarray
    labels: np.ndarray
    semantic_alignment_normalized: np.ndarray
    sample_diversity_normalized: np.ndarray
    valid: np.ndarray | None = None
    image_features: torch.Tensor | FeatureStore | None = None
    diversity_gate: np.ndarray | None = None
    class_posterior_normalized: np.ndarray | None = None
    demoted: np.ndarray | None = None
    posterior_alone: bool = False

    def __post_init__(self):
        # Own, writable copies (N numbers each): arrays read from a dataset can be read-only, which torch.from_numpy
        # warns about, and a caller editing its arrays afterwards must not change a selection in progress.
        self.row_id = np.array(self.row_id, dtype=np.int64)
        num_rows = self.row_id.shape[0]
        self.labels = np.array(self.labels, dtype=np.int64)
        self.semantic_alignment_normalized = np.array(self.semantic_alignment_normalized, dtype=np.float32)
        self.sample_diversity_normalized = np.array(self.sample_diversity_normalized, dtype=np.float32)
        self.valid = np.ones(num_rows, dtype=bool) if self.valid is None else np.array(self.valid, dtype=bool)
        for name in ("row_id", "labels", "semantic_alignment_normalized", "sample_diversity_normalized", "valid"):
            if getattr(self, name).shape != (num_rows,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}; expected ({num_rows},).")
        # Ids in ascending order (a scores table's) are unique without the sort np.unique does.
        increasing = num_rows < 2 or bool((self.row_id[1:] > self.row_id[:-1]).all())
        if not increasing and np.unique(self.row_id).shape[0] != num_rows:
            raise ValueError("row_id has duplicates; every row needs its own id.")
        for name, dtype in (("class_posterior_normalized", np.float32), ("demoted", bool), ("diversity_gate", bool)):
            if getattr(self, name) is not None:
                setattr(self, name, np.array(getattr(self, name), dtype=dtype))
                if getattr(self, name).shape != (num_rows,):
                    raise ValueError(f"{name} has shape {getattr(self, name).shape}; expected ({num_rows},).")
        if self.image_features is not None and tuple(self.image_features.shape[:1]) != (num_rows,):
            raise ValueError(f"image_features has {self.image_features.shape[0]} rows; expected {num_rows}.")

    @property
    def num_rows(self) -> int:
        return self.row_id.shape[0]

    def alignment(self) -> torch.Tensor:
        """The reward's alignment term before scaling, float32 ``[N]`` in ``[0, 1]``: SAS~, or with a class posterior
        min-max(SAS~ + posterior~) over the valid rows (the cosine and how far the label beats the other classes),
        or posterior~ alone with ``posterior_alone``."""
        return alignment_term(
            self.semantic_alignment_normalized, self.class_posterior_normalized, self.valid, self.posterior_alone
        )

    def preferred(self) -> np.ndarray:
        """``bool[N]``: the valid rows that are not demoted."""
        return self.valid if self.demoted is None else self.valid & ~self.demoted

    def reward(self, alpha: float) -> np.ndarray:
        """``float64[N]`` reward ``c_i`` of :func:`hf_clipsel.scoring.reward` on :meth:`alignment` (higher is better;
        invalid: -inf). Demoted rows are shifted below every other valid row (by the valid rewards' range + 1), so
        every ranking by reward takes them last and keeps their order among themselves."""
        rewards = reward(
            self.alignment(),
            torch.from_numpy(self.sample_diversity_normalized),
            alpha,
            torch.from_numpy(self.valid),
            None if self.diversity_gate is None else torch.from_numpy(self.diversity_gate),
        ).numpy()
        demoted = np.zeros_like(self.valid) if self.demoted is None else self.valid & self.demoted
        if demoted.any():
            finite = rewards[self.valid]
            rewards[demoted] -= finite.max() - finite.min() + 1.0
        return rewards


class SelectionResult(dict):
    """``{ratio: bool[N] mask}``, plus ``diagnostics``: ``{ratio: {name: value}}`` for logging.

    Every selector records ``budget`` (k), ``num_selected`` and ``shortfall`` (how many rows k exceeds the number of
    valid rows by: > 0 means every valid row was selected and the subset is that much smaller than asked); some add
    their own entries (``sgd``: iterations, objective, ...).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.diagnostics: dict[float, dict[str, float]] = {}

    def add(self, ratio: float, mask: np.ndarray, budget_rows: int, num_valid: int, **extra: float) -> None:
        """Record the mask of ``ratio`` and its diagnostics."""
        self[ratio] = mask
        self.diagnostics[ratio] = {
            "budget": budget_rows,
            "num_selected": int(mask.sum()),
            "shortfall": max(budget_rows - num_valid, 0),
            **extra,
        }


Selector = Callable[[SelectionInputs, "list[float]", object], SelectionResult]


@dataclass(frozen=True)
class SelectorSpec:
    """A registered selector and what it can do.

    Attributes:
        name: the ``selection_method`` that chooses it.
        function: ``(inputs, ratios, config) -> SelectionResult``; ``config`` is the run's
            :class:`~hf_clipsel.selection.config.SelectionConfig`, whose ``selector_options`` holds this selector's
            options (an instance of ``options``, or None when it takes none).
        options: a dataclass of the selector's own settings. Its field names are flat configuration keys (YAML and
            ``--flags``), so they must not clash with any other setting.
        needs_image_features: it reads ``inputs.image_features`` (saved scores alone cannot feed it).
        ranks_by_reward: it ranks rows by the reward, which the scores table then records per ratio.
        supports_class_balance: it honours ``class_balanced`` (per-class quotas).
        exact_budget: it selects exactly ``min(k, valid rows)`` rows per ratio (checked after every selection).
    """

    name: str
    function: Selector
    options: type | None = None
    needs_image_features: bool = False
    ranks_by_reward: bool = False
    supports_class_balance: bool = True
    exact_budget: bool = True


SELECTORS = Registry("selector", entry_point_group="hf_clipsel.selectors")


def register_selector(
    name: str,
    *,
    options: type | None = None,
    needs_image_features: bool = False,
    ranks_by_reward: bool = False,
    supports_class_balance: bool = True,
    exact_budget: bool = True,
) -> Callable[[Selector], Selector]:
    """Decorator: register a selector under ``name`` with its traits (see :class:`SelectorSpec`).

    Raises ``ValueError`` when ``name`` is taken or not a string, the selector is not callable, or ``options`` is not
    a dataclass."""
    if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ValueError(f"the options of selector {name!r} must be a dataclass, not {options!r}.")

    def decorator(selector: Selector) -> Selector:
        if not callable(selector):
            raise ValueError(f"selector {name!r} must be a function (inputs, ratios, config), not {selector!r}.")
        spec = SelectorSpec(
            name, selector, options, needs_image_features, ranks_by_reward, supports_class_balance, exact_budget
        )
        SELECTORS.register(name, spec)
        return selector

    return decorator


def selector_spec(name: str) -> SelectorSpec:
    """The :class:`SelectorSpec` registered under ``name``; ``ValueError`` listing the registered names otherwise."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selection method {name!r}; registered methods: {', '.join(SELECTORS.names())}.")
    return SELECTORS[name]


def get_selector(name: str) -> Selector:
    """The selector function registered under ``name``; ``ValueError`` listing the registered names otherwise."""
    return selector_spec(name).function


def check_result(spec: SelectorSpec, result, inputs: SelectionInputs, ratios: list[float]) -> None:
    """What every selector promises, checked: one boolean mask of N rows per ratio, only valid rows, and (for an
    ``exact_budget`` selector) exactly ``min(k, valid rows)`` of them. ``ValueError`` naming the selector otherwise."""
    where = f"selector {spec.name!r}"
    if not isinstance(result, dict):
        raise ValueError(f"{where} returned {type(result).__name__}, not a SelectionResult of masks per ratio.")
    missing = [f"{r:g}" for r in ratios if r not in result]
    if missing:
        raise ValueError(f"{where} returned no mask for ratio {', '.join(missing)}.")
    num_valid = int(inputs.valid.sum())
    for ratio in ratios:
        mask = np.asarray(result[ratio])
        if mask.dtype != bool or mask.shape != (inputs.num_rows,):
            raise ValueError(
                f"{where} returned a {mask.dtype} mask of shape {mask.shape} at ratio {ratio:g}; expected bool of "
                f"shape ({inputs.num_rows},)."
            )
        if (mask & ~inputs.valid).any():
            raise ValueError(f"{where} selected rows that are not selectable (flagged) at ratio {ratio:g}.")
        wanted = min(budget(ratio, inputs.num_rows), num_valid)
        if spec.exact_budget and int(mask.sum()) != wanted:
            raise ValueError(
                f"{where} selected {int(mask.sum())} rows at ratio {ratio:g}; its budget is exactly {wanted}."
            )


def quota_array(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`class_quotas` as arrays: the sorted class labels and their quotas."""
    classes, sizes = np.unique(labels, return_counts=True)
    total = int(sizes.sum())
    k = min(k, total)
    if total == 0:
        return classes, sizes
    # Integer arithmetic: the shares are exact, so rounding never depends on float artefacts.
    quotas, remainders = np.divmod(sizes.astype(np.int64) * k, total)
    left_over = k - int(quotas.sum())
    # Largest remainder first, then the smaller label (np.lexsort sorts by the last key first).
    by_remainder = np.lexsort((classes, -remainders))
    quotas[by_remainder[:left_over]] += 1
    return classes, quotas


def class_quotas(labels: np.ndarray, k: int) -> dict[int, int]:
    """Split ``k`` over the classes of ``labels`` in proportion to their sizes, summing to exactly ``min(k, n)``.

    Largest-remainder (Hamilton) rounding: each class gets floor(k * n_c / n), and the rows left over go one each to
    the classes with the largest remainders (ties: smaller label first). Each quota is within 1 of the exact share
    k * n_c / n, and never exceeds n_c. Known property of this rounding (the "Alabama paradox"): a larger k can give
    one class one row fewer, so class-balanced subsets of two ratios need not be nested.
    """
    classes, quotas = quota_array(np.asarray(labels, dtype=np.int64), k)
    return {int(c): int(q) for c, q in zip(classes, quotas)}


def split_by_label(rows: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """``rows`` (positions) grouped by ``labels[rows]``, groups in ascending label order, rows in their given order."""
    by_class = rows[np.argsort(labels[rows], kind="stable")]
    return np.split(by_class, np.flatnonzero(np.diff(labels[by_class])) + 1)


def ranking(key: np.ndarray, row_id: np.ndarray) -> np.ndarray:
    """Row positions sorted by ``key`` descending, ties by ``row_id`` ascending."""
    return np.lexsort((row_id, -np.asarray(key, dtype=np.float64)))


def top_of_ranking(order: np.ndarray, inputs: SelectionInputs, k: int, class_balanced: bool) -> np.ndarray:
    """Mask of the first ``k`` valid rows of ``order`` (all valid rows if fewer than ``k``).

    With ``class_balanced`` the first ``quota_c`` valid rows of each class in ``order`` (see :func:`class_quotas`).
    """
    order = order[inputs.valid[order]]
    mask = np.zeros(inputs.num_rows, dtype=bool)
    if not class_balanced:
        mask[order[:k]] = True
        return mask
    labels = inputs.labels[order]
    classes, quotas = quota_array(labels, k)
    # Rank of each row within its class, in the order given: a stable sort by label keeps that order inside a class.
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class = np.empty(order.shape[0], dtype=np.int64)
    rank_in_class[by_class] = np.arange(order.shape[0]) - starts
    quota_per_row = quotas[np.searchsorted(classes, labels)]
    mask[order[rank_in_class < quota_per_row]] = True
    return mask


def top_k(key: np.ndarray, inputs: SelectionInputs, k: int, class_balanced: bool) -> np.ndarray:
    """Mask of the ``k`` valid rows with the largest ``key``, ties by row id ascending (all valid rows if fewer).

    The same rows as the first ``k`` valid rows of :func:`ranking`, found in O(N) by a partition instead of a sort,
    so every ratio costs one pass over the rows. With ``class_balanced`` the ranking is cut per class
    (:func:`top_of_ranking`). NaN keys rank last.
    """
    if class_balanced:
        return top_of_ranking(ranking(key, inputs.row_id), inputs, k, class_balanced=True)
    mask = np.zeros(inputs.num_rows, dtype=bool)
    rows = np.flatnonzero(inputs.valid)
    k = min(k, rows.shape[0])
    if k == 0:
        return mask
    negated = -np.asarray(key, dtype=np.float64)[rows]
    negated[np.isnan(negated)] = np.inf
    threshold = np.partition(negated, k - 1)[k - 1]  # the k-th largest key
    above = negated < threshold
    tied = np.flatnonzero(negated == threshold)
    tied = tied[np.argsort(inputs.row_id[rows[tied]], kind="stable")[: k - int(above.sum())]]
    mask[rows[above]] = True
    mask[rows[tied]] = True
    return mask


def ratio_budgets(inputs: SelectionInputs, ratios: list[float]) -> dict[float, int]:
    """``k`` per ratio: floor(ratio * N) over all N rows (valid or not), via :func:`hf_clipsel.core.names.budget`."""
    return {ratio: budget(ratio, inputs.num_rows) for ratio in ratios}


def kept_share(subset: np.ndarray, other: np.ndarray) -> float:
    """The share of ``subset``'s rows (a boolean mask) that ``other`` keeps too, in [0, 1]; 0 for an empty subset."""
    return float((subset & other).sum() / max(int(subset.sum()), 1))
