"""The score registry: what a score is, and the one place that says what each score can do.

A score (cleanlab's issue managers are the model) is a class registered with :func:`register_score`. It declares:

- ``name`` and its ``columns`` in the scores table, each with its meaning and value range;
- how they are computed: :meth:`Score.compute` from the features of every row (:class:`ScoreInputs`, read in
  blocks), and for a score measured on the pixels, :meth:`Score.measure` on each decoded image while the images are
  embedded (cached with the embedding cache, so a rerun measures nothing again);
- whether it flags rows at selection time (:meth:`Score.flags`: the reward ranks flagged rows after every other row,
  and a selection records the flags in its ``flag_column``), and which ``drop_reason`` explains a dropped row
  (:meth:`Score.explains`), with a ``reason_rank`` that says which reason wins when several apply.

The scores table, the drop reasons, the summary, the report and the dataset card iterate :data:`SCORES`; adding a
score is one file. Other packages register scores through the entry-point group ``hf_clipsel.scores``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..core.registry import Registry
from ..features import FeatureStore, Share


@dataclass(frozen=True)
class Column:
    """A column of the scores table: what it measures (``meaning``, one line) and its range and which way is better
    (``value_range``, e.g. "[-1, 1]; higher: better aligned"); ``dtype`` float32 unless said (e.g. int64 row ids);
    ``length``: each row holds that many values (a pixel descriptor a score measures, :attr:`Score.measured`)."""

    name: str
    meaning: str
    value_range: str
    dtype: str = "float32"
    length: int | None = None


@dataclass
class ScoreInputs:
    """What :meth:`Score.compute` reads, one entry per row of the source.

    The image features are out of core (hf_clipsel.features): a score reads them in blocks, never whole. Per-row
    scores go block by block (``inputs.features.map_rows(function, inputs.share)``), per-class ones class by class
    (``inputs.features.map_classes(function, valid, inputs.share)``: the function reads a class's rows with
    ``inputs.features.rows(row_ids)``, one contiguous read); both share the work out between the processes of
    ``share`` and give every process all N values. ``inputs.image_features[rows]`` (the same store) reads the
    given rows, in the order asked, as a ``[len(rows), d]`` tensor.

    Attributes:
        features: the ``[N, d]`` float32 image features of the (adapted) model, not normalised
            (:class:`~hf_clipsel.features.FeatureStore`, class-sorted on disk).
        class_features: ``[C, d]`` float32 class text features, L2-normalised.
        labels: ``[N]`` int64 given labels, clamped to ``[0, C)`` (unusable rows are not ``valid``).
        valid: ``[N]`` bool: usable rows (decoded image, usable label). Scores of other rows are 0.
        logit_scale, logit_bias: the model's logits are ``logit_scale * cosine + logit_bias``.
        posterior_link: how its family turns logits into a class posterior (``softmax`` or ``sigmoid``:
            scoring.class_posterior).
        knn_k: neighbours per row for scores that compare a row with its class.
        knn_block_rows: rows of a class held at once by such a comparison (larger classes go in blocks), ``>= 2``.
        duplicate_crops: the duplicate score searches cropped copies too (``ScoringConfig.duplicate_crops``).
        predicted: ``[N]`` int64 class the model prefers (argmax of the cosines with ``class_features``), computed
            once by the score stage for the table and for the scores that need it; None (inputs built by hand): a
            score that needs it computes it.
        statistics: ``{column: float32[N]}`` what the scores' :meth:`Score.measure` found while decoding; a
            measured descriptor (``length`` values a row, the duplicate score's uint8 thumbnails) is a
            :class:`~hf_clipsel.features.FeatureStore` of its dtype sorted as ``features`` (the score stage's: read
            by row ids, a class at a time, never held whole) or an ``[N, length]`` array (inputs built by hand).
        share: this process's part of the work (one process: all of it).
    """

    features: FeatureStore
    class_features: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    logit_scale: float
    logit_bias: float = 0.0
    posterior_link: str = "softmax"
    knn_k: int = 100
    knn_block_rows: int = 8192
    duplicate_crops: bool = False
    predicted: torch.Tensor | None = None
    statistics: dict[str, np.ndarray] = field(default_factory=dict)
    share: Share = field(default_factory=Share)

    @property
    def image_features(self) -> FeatureStore:
        """The features, indexable by row ids: ``inputs.image_features[rows]`` is a ``[len(rows), d]`` tensor."""
        return self.features


class Score:
    """Base class of a registered score. Subclasses set the class attributes and override what they do."""

    name: ClassVar[str]
    columns: ClassVar[tuple[Column, ...]] = ()
    # True: measure() runs on every decoded image while embedding, and its values fill the columns.
    measures_pixels: ClassVar[bool] = False
    # What measure() returns when it is not the score's columns: values (e.g. a pixel descriptor) that compute()
    # reads from ``inputs.statistics`` and that the scores table does not show. None: the columns.
    measured: ClassVar[tuple[Column, ...] | None] = None
    # Bump when measure() would give other numbers for the same image: it names the statistics' cache.
    version: ClassVar[int] = 1
    # The reason a dropped row gets when this score explains it (None: it explains none), and its precedence: of
    # the reasons that apply to a row, the one with the highest rank is given.
    drop_reason: ClassVar[str | None] = None
    reason_rank: ClassVar[int] = 0
    # The column a selection writes with this score's flags ("" or what was found), when it flags rows.
    flag_column: ClassVar[str | None] = None

    def measure(self, image) -> tuple[float, ...]:
        """One value per column (or per :attr:`measured` entry) for one decoded RGB image (``PIL.Image``), or for
        ``None`` (an image that did not decode: such a row is never selected, so any value does); only for
        ``measures_pixels`` scores."""
        raise NotImplementedError

    def compute(self, inputs: ScoreInputs) -> dict[str, np.ndarray]:
        """``{column: float32[N]}`` for every column; by default the values :meth:`measure` found."""
        return {column.name: np.asarray(inputs.statistics[column.name], dtype=np.float32) for column in self.columns}

    def flags(self, table: dict, selection) -> np.ndarray | None:
        """``object[N]`` of ``""`` or what was found, for the rows this score has the reward rank last, from the
        scores ``table`` (numpy columns) and the selection settings; None when it flags nothing."""
        return None

    def explains(self, table: dict, selection) -> np.ndarray | None:
        """``bool[N]``: rows whose drop :attr:`drop_reason` explains; by default the rows it flags."""
        flags = self.flags(table, selection)
        return None if flags is None else flags != ""


SCORES = Registry("score", entry_point_group="hf_clipsel.scores")


def register_score(score_class: type[Score]) -> type[Score]:
    """Class decorator: register an instance of ``score_class`` under its ``name``. ``ValueError`` when the name is
    taken, the class is not a :class:`Score`, or one of its columns is already another score's."""
    if not (isinstance(score_class, type) and issubclass(score_class, Score)):
        raise ValueError(f"a score must be a subclass of hf_clipsel.scores.Score, not {score_class!r}.")
    taken = {column.name: score.name for score in SCORES.values() for column in score.columns}
    for column in score_class.columns:
        if column.name in taken:
            raise ValueError(
                f"score {score_class.name!r}: column {column.name!r} is already score {taken[column.name]!r}'s."
            )
    SCORES.register(getattr(score_class, "name", None), score_class())
    return score_class


def registered_scores() -> list[Score]:
    """Every registered score, built-ins first, in registration order (the scores table's column order)."""
    return [SCORES[name] for name in SCORES]


def score_columns() -> list[Column]:
    """Every score column of the scores table, in order."""
    return [column for score in registered_scores() for column in score.columns]


def measured_specs() -> list[Column]:
    """What the pixel-measuring scores measure while embedding (their columns, or their :attr:`Score.measured`), in
    order: the pixel statistics' cache holds one entry per row of each."""
    return [
        column
        for score in registered_scores()
        if score.measures_pixels
        for column in (score.columns if score.measured is None else score.measured)
    ]


def measured_columns() -> list[str]:
    """The names of :func:`measured_specs`, in order: the keys of :attr:`ScoreInputs.statistics`."""
    return [column.name for column in measured_specs()]


def measure_image(image) -> tuple[float, ...]:
    """Every pixel-measuring score's values for one decoded image, in :func:`measured_columns` order."""
    return tuple(value for score in registered_scores() if score.measures_pixels for value in score.measure(image))


def measurement_versions() -> dict[str, int]:
    """``{score name: version}`` of the pixel-measuring scores: what names the statistics' cache."""
    return {score.name: score.version for score in registered_scores() if score.measures_pixels}


def flag_columns() -> list[str]:
    """The columns a selection writes with the scores' flags."""
    return [score.flag_column for score in registered_scores() if score.flag_column]


def drop_reason_order() -> list[str]:
    """The scores' drop reasons, strongest first."""
    explaining = sorted((s for s in registered_scores() if s.drop_reason), key=lambda s: -s.reason_rank)
    return [score.drop_reason for score in explaining]
