"""Qwen2-VL's vision attention over many images of one size in one call.

Qwen2-VL attends within each image. With Flash Attention it passes the images' boundaries
to one varlen kernel; with any other implementation (PyTorch's SDPA on CPU, for instance)
it splits the patches image by image and calls attention once per image and layer: over a
hundred tiny calls per training step, whose overhead outweighs their arithmetic. MOON shows
the model square images of one size, so every image has the same number of patches, and the
per-image attentions stack into one batched SDPA call. The result is the same attention;
mixed sizes (other callers) and Flash Attention keep the original path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention, apply_rotary_pos_emb_vision


class SameSizeImagesAttention(VisionAttention):
    """`VisionAttention` with the per-image loop batched when every image has as many patches."""

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if self.config._attn_implementation != "sdpa" or bool((lengths != lengths[0]).any()):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        patches, images = hidden_states.shape[0], len(lengths)
        query, key, value = self.qkv(hidden_states).reshape(patches, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
        # (patches, heads, head_dim) -> (images, heads, patches per image, head_dim)
        query, key, value = (t.reshape(images, patches // images, self.num_heads, -1).transpose(1, 2)
                             for t in (query, key, value))
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(patches, -1))


def batch_same_size_images(model: torch.nn.Module) -> None:
    """Swaps Qwen2-VL's vision attention modules for `SameSizeImagesAttention` (same weights)."""
    for module in model.modules():
        if type(module) is VisionAttention:
            module.__class__ = SameSizeImagesAttention
