"""SigLIP (``model_type: siglip``), which includes every fixed-resolution SigLIP 2 checkpoint
(``google/siglip2-*-patchNN-RES``).

SigLIP has no projection layers. The vision tower ends in a MAP head: attention of a learned probe over the patch
tokens, then ``a + mlp(layernorm(a))``; the text tower ends in ``text_model.head``, a Linear on the last token.

Cache boundary: ``a``, the probe's attention output (one vector per image, hidden_size long). It is the last single
vector before a trainable Linear of the pretrained model: everything before it is a token sequence (too large to
cache), and the head's output is the final embedding, after which nothing could be adapted. So the ``projection``
preset wraps the head's last Linear on each side (``vision_model.head.mlp.fc2``, ``text_model.head``) and trains on
the embedding cache, as CLIP's projections do. LoRA on the head's ``nn.MultiheadAttention`` ``out_proj`` would be
ignored (the attention reads its weight directly), so neither preset targets it; ``encoder_lora`` adds the encoder
layers' attention, matched by a regex that keeps it off the head.

Prompts are padded to ``max_length`` (``text_config.max_position_embeddings``), as SigLIP was trained: the text is
pooled at the last position, a pad token for short prompts; the checkpoints' tokenizers return ``input_ids`` only.

Logits are ``exp(logit_scale) * cosine + logit_bias``; the adapters' ``class_ce`` loss is SigLIP's own sigmoid loss
of each image against every class prompt. The class posterior is a softmax over the classes, not the sigmoid of the
given label: the posterior asks how much closer an image is to its label than to every other class, which the
sigmoid of one pair cannot say (it is a monotone function of the alignment score; the bias, fitted for
pretraining's one positive per batch, cancels in a softmax), so SigLIP's posterior is CLIP's formula at its own
logit scale. Measured on a SigLIP proxy trained with the sigmoid loss (recipes/benchmarks/README.md, "Other
families: a SigLIP proxy"): in the default reward the softmax kept less label noise than the sigmoid in 5 of 9
label-noise cells, by up to 0.77 points (the sigmoid by at most 0.10), and less in total; the sigmoid ranked like
the alignment score alone.
"""

import torch
import torch.nn.functional as F
from transformers import SiglipModel

from .base import EncoderFamily, register_family


@register_family
class SiglipFamily(EncoderFamily):
    model_type = "siglip"
    model_class = SiglipModel
    examples = (
        "google/siglip-base-patch16-224",
        "google/siglip-so400m-patch14-384",
        "google/siglip2-base-patch16-224",
    )
    projection_targets = ("vision_model.head.mlp.fc2", "text_model.head")
    encoder_targets = r".*(vision_model|text_model)\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
    float32_modules = ("vision_model.head.layernorm", "vision_model.head.mlp", "text_model")
    prompt_templates = ("This is a photo of {}.",)

    def load(self, path, dtype, **kwargs):
        model, processor = super().load(path, dtype, **kwargs)
        # The head's tail (layernorm, MLP) stays float32 with the adapters on it, after an attention that runs in
        # the tower's dtype: the tail takes its input in float32, in the model's own forward too.
        model.vision_model.head.layernorm.register_forward_pre_hook(_in_float32)
        return model, processor

    def default_lora_rank(self, model_config) -> int:
        return model_config.vision_config.hidden_size  # fc2 and the text head both end in it

    def vision_tower_outputs(self, model, inputs):
        pooled = []
        hook = model.vision_model.head.attention.register_forward_hook(lambda _, __, out: pooled.append(out[0][:, 0]))
        try:
            model.vision_model(**self._to_tower(model, inputs))
        finally:
            hook.remove()
        return pooled[0].float()

    def image_features(self, model, cached):
        head = model.vision_model.head
        cached = cached.to(device=model.device, dtype=torch.float32)
        return cached + head.mlp(head.layernorm(cached))

    def tokenize(self, tokenizer, prompts, model_config):
        length = model_config.text_config.max_position_embeddings
        return dict(tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"))

    def text_tower_outputs(self, model, inputs):
        inputs = {name: value.to(model.device) for name, value in inputs.items()}
        return model.text_model(**inputs).last_hidden_state[:, -1].float()  # what text_model.head reads

    def text_features(self, model, text_pooled):
        return model.text_model.head(text_pooled.to(device=model.device, dtype=torch.float32))

    def logit_bias(self, model) -> float:
        return float(model.logit_bias)

    def class_loss(self, logits, labels):
        # SigLIP's pretraining loss: every (image, prompt) pair an independent binary decision, summed over prompts.
        targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(labels)


def _in_float32(module, args):
    return tuple(arg.float() for arg in args)
