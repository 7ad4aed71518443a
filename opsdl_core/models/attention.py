"""Grouped-query attention without copying K/V on the CPU.

transformers' SDPA attention lets ``torch.nn.functional.scaled_dot_product_attention`` do
grouped-query attention itself (``enable_gqa=True``) only when no attention mask is passed
(``use_gqa_in_sdpa``); with a mask it first expands K and V from the key/value heads to every
query head (``repeat_kv``: for SmolLM2-135M 3 → 9 heads, a copy of the whole cache in every
layer at every step). The project passes a mask at every rollout, decode and scoring step
(left-padded batches), so it paid that copy everywhere.

On the CPU, torch's SDPA takes a mask and ``enable_gqa=True`` together and computes the same
attention (tests: outputs, log-probs and gradients against the stock implementation).
:func:`use_gqa_attention` switches a loaded model to it; on other devices, with
``output_attentions``, a position bias or a paged cache, the call goes to transformers' own
SDPA function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "opsdl_sdpa_gqa"
_registered = False


def gqa_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any):
    """transformers' attention-function signature. query [B, Hq, Tq, D]; key, value [B, Hkv, Tk, D];
    attention_mask [B, 1, Tq, Tk] (bool or additive) or None. Returns ([B, Tq, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups <= 1 or query.device.type != "cpu" or kwargs.get("output_attentions")
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
            or key.shape[-1] != value.shape[-1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_len:  # as upstream: an empty static cache's tail is never attended
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention function (and SDPA's mask builder under the same name); idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, gqa_sdpa_attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME


def use_gqa_attention(model: Any) -> bool:
    """Switch a transformers model from ``sdpa`` to the GQA-aware function, in place.

    Only models that use grouped-query attention (fewer key/value heads than query heads) and the
    stock ``sdpa`` implementation are switched; anything else (eager, flash, remote code that does
    not follow the attention interface) is left as it is. Returns whether the model was switched.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads or kv_heads >= heads:
        return False
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    model.set_attn_implementation(register())
    return getattr(config, "_attn_implementation", None) == NAME
