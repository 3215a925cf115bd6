"""Self-attention for open_clip's transformer blocks without nn.MultiheadAttention's layout copies.

open_clip's `ResidualAttentionBlock` runs `nn.MultiheadAttention(batch_first=True)`, which in training turns its
[B, L, D] input to sequence-first, splits the fused q/k/v projection through several reshapes and copies back; on
CPU those copies and zero-fills (and their backward) were ~7% of a clipkit-tiny training step (issue 10's profile).
`PackedSelfAttention` computes the same function the way timm's and open_clip's own `Attention` do: one q/k/v
projection viewed as [3, B, H, L, hd], `scaled_dot_product_attention`, one transpose back, the output projection.

It holds the very same parameters under the same names (`in_proj_weight`, `in_proj_bias`, `out_proj.weight`,
`out_proj.bias`), so state dicts, checkpoints and open_clip exports are unchanged. `pack_attention` swaps it in only
where it is exactly the same function: self-attention with a fused projection, biases, no extra key/value biases,
no zero attention, no dropout, batch-first. Tested against nn.MultiheadAttention in float64 (outputs and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PackedSelfAttention(nn.Module):
    """Called like nn.MultiheadAttention by open_clip's `ResidualAttentionBlock.attention`: (query, key, value,
    need_weights=False, attn_mask=None) with key and value the query itself; returns (output [B, L, D], None)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads = mha.num_heads
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None):
        if not (_same(key, query) and _same(value, query)) or need_weights or key_padding_mask is not None:
            raise ValueError("PackedSelfAttention computes self-attention without attention weights or key padding")
        b, n, d = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None:  # additive, as nn.MultiheadAttention takes it (bool: True = not attended)
            attn_mask = (torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
                         if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, L, hd]
        return self.out_proj(x.transpose(1, 2).reshape(b, n, d)), None


def _same(other: torch.Tensor | None, query: torch.Tensor) -> bool:
    """`other` is the query or a view of the same memory (DeepSpeed ZeRO-3's module hooks re-wrap each input)."""
    return other is None or other is query or (
        other.data_ptr() == query.data_ptr() and other.shape == query.shape and other.stride() == query.stride())


def _packable(mha: nn.Module) -> bool:
    return (type(mha) is nn.MultiheadAttention and mha.batch_first and mha._qkv_same_embed_dim
            and mha.in_proj_bias is not None and mha.bias_k is None and mha.bias_v is None
            and not mha.add_zero_attn and mha.dropout == 0.0)


def pack_attention(net: nn.Module) -> int:
    """Replaces the attention of every open_clip `ResidualAttentionBlock` in `net` that qualifies (see the module
    docstring) by a `PackedSelfAttention` over the same parameters; returns how many were replaced."""
    from open_clip.transformer import ResidualAttentionBlock

    replaced = 0
    for block in net.modules():
        if isinstance(block, ResidualAttentionBlock) and not hasattr(block, "ln_1_kv") and _packable(block.attn):
            block.attn = PackedSelfAttention(block.attn)
            replaced += 1
    return replaced
