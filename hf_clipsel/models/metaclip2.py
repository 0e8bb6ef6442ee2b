"""MetaCLIP 2 (``model_type: metaclip_2``): CLIP's architecture with an XLM-R tokenizer (the text is pooled at the
first eos). Everything but the class is CLIP's: the same projections, cache boundary, presets and softmax."""

from transformers import MetaClip2Model

from .base import EncoderFamily, register_family


@register_family
class MetaClip2Family(EncoderFamily):
    model_type = "metaclip_2"
    model_class = MetaClip2Model
    examples = ("facebook/metaclip-2-worldwide-huge-quickgelu",)
