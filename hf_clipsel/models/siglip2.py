"""SigLIP 2 NaFlex (``model_type: siglip2``; the fixed-resolution SigLIP 2 checkpoints are ``siglip``).

SigLIP's towers, heads, cache boundary, presets, prompts and posterior (hf_clipsel.models.siglip), with native
aspect ratios: the image processor resizes each image to at most ``max_num_patches`` patches of its own aspect ratio
and returns patch sequences (B, max_num_patches, 3 * p * p) with ``pixel_attention_mask`` and ``spatial_shapes``.
Those are no image batch that a normalisation could finish on the device, so the processor's own output is used
whole (``device_normalisation`` off). The image processor is called directly: ``Siglip2Processor``'s own defaults
(``max_num_patches=256``) would override the checkpoint's saved image settings.
"""

from transformers import Siglip2Model

from .base import register_family
from .siglip import SiglipFamily


@register_family
class Siglip2Family(SiglipFamily):
    model_type = "siglip2"
    model_class = Siglip2Model
    examples = ("google/siglip2-base-patch16-naflex", "google/siglip2-so400m-patch16-naflex")
    device_normalisation = False
