"""The names the prompts say for each class: readable names where the dataset's class names are WordNet ids
(ImageNet's folders: ``n01440764``), taken from timm's ImageNet synset tables; and class names read from a file.

The dataset's labels and class names are never changed: the scores, the subsets and the card keep the ids; only the
text of the prompts ("a photo of a tench.") uses the readable names.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from functools import cache
from pathlib import Path

from timm.data import ImageNetInfo, infer_imagenet_subset

logger = logging.getLogger(__name__)

WORDNET_ID = re.compile(r"n\d{8}")  # a WordNet noun synset: "n" and its 8-digit offset
# Where to look a synset up when the class count names no ImageNet subset (a 10-class folder, say): the 1k classes,
# then the largest synset list timm ships.
FALLBACK_SUBSETS = ("imagenet-1k", "imagenet-21k-goog")


def read_class_names_file(path: str | Path) -> list[str]:
    """Class names from a text file, one per line in label order (surrounding spaces and trailing blank lines are
    ignored).

    Raises:
        OSError: the file cannot be read.
        ValueError: it holds no name, or an empty line between names.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise OSError(
            f"class_names_file {str(path)!r} cannot be read ({type(error).__name__}); give a UTF-8 text file with one "
            "class name per line, in label order."
        ) from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(
            f"class_names_file {str(path)!r} holds no class name; write one class name per line, in label order."
        )
    if "" in names:
        raise ValueError(
            f"class_names_file {str(path)!r}: line {names.index('') + 1} is empty; write one class name per line, in "
            "label order."
        )
    return names


@cache
def synset_table(subset: str) -> tuple[ImageNetInfo, frozenset[str]]:
    """timm's table of an ImageNet subset and the set of its synsets (read once per process)."""
    info = ImageNetInfo(subset)
    return info, frozenset(info.label_names())


def imagenet_info(class_names: list[str]) -> ImageNetInfo | None:
    """timm's ImageNet table that knows every one of ``class_names`` as a synset, or None."""
    subsets = (infer_imagenet_subset({"num_classes": len(class_names)}), *FALLBACK_SUBSETS)
    for subset in dict.fromkeys(s for s in subsets if s):  # in order, each once
        info, synsets = synset_table(subset)
        if synsets.issuperset(class_names):
            return info
    return None


def readable_names(class_names: list[str], info: ImageNetInfo) -> list[str]:
    """Each synset's first lemma ("n01440764" -> "tench"); where two classes share it ("crane" the bird and the
    machine), all its lemmas, then its WordNet definition too, so that no two classes get the same prompt."""
    lemmas = [info.label_name_to_description(name) for name in class_names]
    detailed = [info.label_name_to_description(name, detailed=True) for name in class_names]
    names = [text.split(", ")[0] for text in lemmas]
    for fuller in (lemmas, detailed):
        counts = Counter(names)
        names = [fuller[i] if counts[name] > 1 else name for i, name in enumerate(names)]
    return names


def prompt_names(class_names: list[str], warn: bool = True) -> list[str] | None:
    """The names the prompts should say instead of ``class_names``, or None to say them as they are.

    When every class name is a WordNet id timm knows, its readable name (:func:`readable_names`). When some look like
    WordNet ids but not all are known synsets, None, and (``warn``) a warning that the prompts will say the ids.
    """
    if not any(WORDNET_ID.fullmatch(name) for name in class_names):
        return None
    info = imagenet_info(class_names)
    if info is not None:
        readable = readable_names(class_names, info)
        if warn:
            logger.info(
                "the class names are WordNet ids: the prompts say their ImageNet names (%s), the labels keep the ids.",
                ", ".join(f"{name} -> {text!r}" for name, text in list(zip(class_names, readable))[:3]),
            )
        return readable
    if warn:
        known = frozenset().union(*(synset_table(subset)[1] for subset in FALLBACK_SUBSETS))
        unknown = [name for name in class_names if name not in known]
        logger.warning(
            "%d of %d class names look like WordNet ids, but %r and %d others are not ImageNet synsets timm knows: "
            'the prompts will say the names as they are ("a photo of a %s."). Give readable names in label order '
            "with --class_names or --class_names_file (one per line).",
            sum(bool(WORDNET_ID.fullmatch(name)) for name in class_names),
            len(class_names),
            unknown[0],
            len(unknown) - 1,
            class_names[0],
        )
    return None
