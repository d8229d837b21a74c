"""A batch-invariant attention for transformers models: `attn_implementation = "specdec_exact"`.

Speculative decoding scores k drafted tokens in one pass; greedy output equals plain decoding exactly
only if each token's logits are the bits a 1-token step would give. The compiled linear kernel
(`kernels.linear`) has that property, and so do the norms, the rotary embedding and the
element-wise ops; torch's sdpa does not (it blocks its work differently for different numbers of
query rows). This attention computes each (query row, head) alone in one fixed order
(`csrc/attention.cpp`): masked keys are skipped, which adds exact zeros, so a token inside a chain
or tree pass gets the same bits as when it is decoded alone. It is used with `--weights native` on
the CPU; other devices, dtypes or batch sizes fall back to sdpa.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from specdec.models.native import kernels

__all__ = ["EXACT_ATTENTION", "exact_attention_forward", "use_exact_attention"]

EXACT_ATTENTION = "specdec_exact"
_registered = False


def exact_attention_forward(
    module: nn.Module,
    query: Tensor,  # [1, H, n, d]
    key: Tensor,  # [1, Hkv, L, d]
    value: Tensor,  # [1, Hkv, L, dv]
    attention_mask: Tensor | None,  # [1, 1 or H, n, L] additive float or bool (True = attend), or None
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:  # ([1, n, H, dv], no weights)
    """transformers' attention-function signature; sdpa where the compiled kernel does not apply."""
    if (query.shape[0] != 1 or query.device.type != "cpu" or query.dtype != torch.float32 or dropout
            or kernels.native_library() is None or query.shape[-1] % 8 or value.shape[-1] % 8):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    n, length = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask.cpu(), float("-inf"))
    elif mask is None and n > 1 and getattr(module, "is_causal", True):  # as sdpa's is_causal, bottom-aligned
        mask = torch.full((1, 1, n, length), float("-inf")).triu_(length - n + 1)
    if mask is not None:
        mask = mask[0, :, :, :length].float()
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = kernels.exact_attention(_rows(query[0]), _rows(key[0]), _rows(value[0]), mask, scale)
    return out.unsqueeze(0), None


def _rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def use_exact_attention(model: nn.Module) -> bool:
    """Switch a transformers model (on the CPU, float32) to the exact attention; False when it cannot be."""
    global _registered
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or kernels.native_library() is None:
        return False
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(EXACT_ATTENTION, exact_attention_forward)
        AttentionMaskInterface.register(EXACT_ATTENTION, sdpa_mask)  # the masks transformers builds: bool
        _registered = True
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(EXACT_ATTENTION)
    else:  # transformers releases before the setter
        model.config._attn_implementation = EXACT_ATTENTION
    return True
