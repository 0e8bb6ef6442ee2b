"""The image-text encoder families hf_clipsel runs on, one file each, registered by ``model_type``
(hf_clipsel.models.base). Importing this package registers the built-in ones."""

from . import clip, metaclip2, siglip, siglip2  # noqa: F401  (registration)
from .base import (
    ENTRY_POINT_GROUP,
    FAMILIES,
    EncoderFamily,
    family_for,
    family_of,
    get_family,
    register_family,
    supported,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "FAMILIES",
    "EncoderFamily",
    "family_for",
    "family_of",
    "get_family",
    "register_family",
    "supported",
]
