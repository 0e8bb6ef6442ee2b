"""The selection settings every selector reads (:class:`SelectionConfig`); a selector's own settings are its
registered options dataclass (hf_clipsel.selection.registry), carried in ``selector_options``."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import ClassVar

from hf_clipsel.core.checks import check_choice, check_positive
from hf_clipsel.core.names import ratio_name
from hf_clipsel.selection.registry import SELECTORS

DIVERSITY_GATES = ("none", "agreement")
ALIGNMENTS = ("sas", "sas+posterior", "posterior")


@dataclass
class SelectionConfig:
    # What a run recorded before a setting existed ran with, where its default changes the results since
    # (hf_clipsel.runs.record: such a record then disagrees with the default instead of passing for what it did).
    ABSENT_MEANS: ClassVar[dict] = {"duplicate_check": False, "damage_false_discovery": None}

    selection_ratios: list[float] = field(
        default_factory=lambda: [0.5], metadata={"help": "Fractions of the dataset to keep, each in (0, 1]."}
    )
    selection_method: str = field(
        default="exact",
        metadata={
            "help": "exact: the k largest rewards (exact budget, deterministic). sgd: the released STE "
            "optimiser. Baselines: random, clip_score, moderate, ccs. Selectors registered by other packages "
            "(entry-point group hf_clipsel.selectors) are chosen the same way."
        },
    )
    alpha: float | None = field(
        default=0.1,
        metadata={
            "help": "Weight of the diversity term in the reward. Unset (null) means alpha = selection ratio, "
            "the paper's text; the released code uses 0.1."
        },
    )
    diversity_gate: str = field(
        # Measured (recipes/benchmarks/README.md, CIFAR-10, 20% and 40% symmetric noise): the gate kept less
        # noise than the ungated reward at every ratio tried.
        default="agreement",
        metadata={
            "help": "none: every row can earn the diversity term (released code). agreement: only rows whose "
            "given label is the class CLIP prefers, so that mislabelled or damaged outliers are not pulled "
            "back in for being rare."
        },
    )
    alignment: str = field(
        # Measured (recipes/benchmarks/README.md, "Against cleanlab"): on one noise draw the posterior alone kept no
        # more label noise than cleanlab's ranking of the same probabilities at ratios 0.3 and 0.5 of every
        # label-noise case (over five draws: more at 0.3 with 20% noise), and less than min-max(SAS~ + P~) under
        # symmetric noise (SAS lets in rows near their prompt but nearer another class's); sas+posterior kept less
        # under asymmetric noise at 0.3 and 0.5.
        default="posterior",
        metadata={
            "help": "The reward's alignment term (exact and sgd). posterior: P~ alone, P = CLIP's zero-shot "
            "probability of the given label over all classes (how much closer the image is to its label's prompt "
            "than to the other classes'). sas: the semantic alignment score alone (paper). sas+posterior: "
            "min-max(SAS~ + P~)."
        },
    )
    damage_check: bool = field(
        default=True,
        metadata={
            "help": "Rank images whose pixels are damaged (noise far above, or contrast or sharpness far below, "
            "the dataset's usual level) after every other row in the reward (exact and sgd): they are kept only if "
            "the budget needs them, and dropped ones get the reason 'damaged'. CLIP can be blind to such damage."
        },
    )
    damage_threshold: float = field(
        # Measured (recipes/benchmarks/README.md, "Against cleanlab"): 3 flagged 1.1% of undamaged CIFAR-10 rows,
        # whose places went to rows of more label noise; 3.5 flags 0.4% and still finds every damaged row there.
        default=3.5,
        metadata={
            "help": "How far from the dataset's median, in robust standard deviations (1.4826 x MAD; noise on a "
            "log scale), a pixel statistic must lie for damage_check to flag the image."
        },
    )
    damage_false_discovery: float | None = field(
        # Measured (recipes/benchmarks/README.md, "A damage check that flags a tail only beyond its mirror"): 0.25
        # flagged none of the undamaged CIFAR-10 pools' images (the fixed threshold 3.5: 0.26-0.4%, ranked last in
        # place of rows of more label noise) and finds as much of 5% damage; it finds less of a damaged 1% or less.
        default=0.25,
        metadata={
            "help": "Flag a pixel statistic's tail only where it holds more images than its mirror: the cut is the "
            "lowest beyond damage_threshold at which one more than the images as far out on the other side (an "
            "estimate of the undamaged ones among those flagged) is at most this share of those flagged. A tail no "
            "heavier than its mirror gets no flag, nor do fewer than 1/share damaged images (a blank one still "
            "does). null (in a config file): every image beyond damage_threshold is flagged."
        },
    )
    duplicate_check: bool = field(
        default=True,
        metadata={
            "help": "Rank every copy of a near-duplicate group but the best one of each label, and every copy of an "
            "image filed under several labels, after every other row (exact and sgd): dropped ones get the reason "
            "'duplicate' or 'conflicting labels'. Groups join exact, re-encoded, resized, recoloured and (with the "
            "scoring setting duplicate_crops) cropped copies; measured in recipes/benchmarks/README.md."
        },
    )
    class_balanced: bool = field(
        default=False, metadata={"help": "Keep each class's share of the dataset (per-class quotas)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for training, random baselines and tie-free shuffles."})
    # The chosen selector's own settings (its registered options dataclass), given as ``options=``; None for a
    # selector that takes none. Not a flag itself: its fields are (ClipselConfig.from_flat groups them).
    options: InitVar[object | None] = None
    selector_options: object | None = field(default=None, init=False)

    def __post_init__(self, options):
        if isinstance(self.selection_ratios, (int, float)):
            self.selection_ratios = [self.selection_ratios]
        if isinstance(self.selection_ratios, str) or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) for r in self.selection_ratios
        ):
            raise ValueError(
                f"selection_ratios must be numbers in (0, 1], e.g. [0.3, 0.5]; got {self.selection_ratios!r}."
            )
        if not self.selection_ratios:
            raise ValueError("selection_ratios is empty; give at least one ratio in (0, 1], e.g. 0.5.")
        for ratio in self.selection_ratios:
            if not 0 < ratio <= 1:
                raise ValueError(
                    f"selection_ratios: {ratio} is outside (0, 1]; a ratio is the fraction of rows to keep, e.g. 0.3."
                )
        if len(set(self.selection_ratios)) != len(self.selection_ratios):
            raise ValueError(f"selection_ratios has duplicates: {self.selection_ratios}.")
        names = [ratio_name(r) for r in self.selection_ratios]
        clashes = sorted({name for name in names if names.count(name) > 1})
        if clashes:  # e.g. 0.5 and 0.5000004: one subset config and one set of score columns for both
            raise ValueError(
                f"selection_ratios {self.selection_ratios} name the same subset twice ({', '.join(clashes)}); "
                "give ratios that differ in their first 6 significant digits."
            )
        self.selection_ratios = sorted(float(r) for r in self.selection_ratios)
        check_positive("alpha", self.alpha, allow_zero=True)
        check_choice("diversity_gate", self.diversity_gate, DIVERSITY_GATES)
        check_choice("alignment", self.alignment, ALIGNMENTS)
        check_positive("damage_threshold", self.damage_threshold)
        if self.damage_false_discovery is not None and not 0 < self.damage_false_discovery <= 1:
            raise ValueError(
                f"damage_false_discovery must be in (0, 1] or null, got {self.damage_false_discovery}; e.g. 0.25."
            )
        check_choice("selection_method", self.selection_method, SELECTORS.names())
        spec = SELECTORS[self.selection_method]
        if self.class_balanced and not spec.supports_class_balance:
            able = [name for name in SELECTORS.names() if SELECTORS[name].supports_class_balance]
            raise ValueError(
                f"selection_method={self.selection_method} does not support class_balanced (per-class quotas); use "
                f"one that does ({', '.join(able)}) or set class_balanced false."
            )
        if options is None:
            self.selector_options = spec.options() if spec.options else None
        elif spec.options is None or not isinstance(options, spec.options):
            expected = spec.options.__name__ if spec.options else "none"
            raise ValueError(
                f"selection_method={self.selection_method} takes options of type {expected}, not "
                f"{type(options).__name__}."
            )
        else:
            self.selector_options = options

    def alpha_for(self, selection_ratio: float) -> float:
        return selection_ratio if self.alpha is None else self.alpha
