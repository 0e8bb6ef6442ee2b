"""CLIP: OpenAI, LAION, DFN and MetaCLIP 1 checkpoints in transformers format (all ``model_type: clip``).

The cache holds the pooled vision output before ``visual_projection``; the ``projection`` preset wraps the two
projections (the paper's adapters), ``encoder_lora`` adds both encoders' attention. Softmax over the classes, as
CLIP was trained. Every answer is :class:`~hf_clipsel.models.base.EncoderFamily`'s default.
"""

from transformers import CLIPModel

from .base import EncoderFamily, register_family


@register_family
class ClipFamily(EncoderFamily):
    model_type = "clip"
    model_class = CLIPModel
    examples = ("openai/clip-vit-base-patch32", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "facebook/metaclip-b32-400m")
