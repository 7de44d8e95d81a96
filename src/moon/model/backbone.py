"""The backbone: a Qwen2-VL model (vision encoder -> merger -> LLM) from `transformers`.

Without a checkpoint it is built from the sizes in `ModelConfig` with random weights
(the tiny default trains on two CPU cores); with `model.checkpoint` it loads a local
Qwen2-VL or Qwen2.5-VL directory. Attention is switched between causal (generative
pretraining) and bidirectional (embedding) through the LLM config's `is_causal`, which
the library applies both to the mask and to the attention kernel.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel, PreTrainedTokenizerBase, Qwen2VLConfig, Qwen2VLModel

from moon.config import ModelConfig
from moon.errors import UserError
from moon.model.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, special_ids

SPATIAL_MERGE = 2  # Qwen2-VL merges 2x2 patches into one LLM token
TEMPORAL_PATCH = 2  # a still image is one frame repeated over the temporal patch


def tiny_config(settings: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2VLConfig:
    ids = special_ids(tokenizer)
    head_dim = settings.hidden_size // settings.heads
    if head_dim * settings.heads != settings.hidden_size or head_dim % 2:
        raise UserError(f"model.hidden_size={settings.hidden_size} must be an even multiple of model.heads={settings.heads}")
    half = head_dim // 2  # multimodal rope splits the rotary half over time, height and width
    spatial = half * 3 // 8
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": settings.hidden_size,
            "intermediate_size": 2 * settings.hidden_size,
            "num_hidden_layers": settings.layers,
            "num_attention_heads": settings.heads,
            "num_key_value_heads": settings.kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [half - 2 * spatial, spatial, spatial], "rope_theta": 10000.0},
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": settings.vision_depth,
            "embed_dim": settings.vision_dim,
            "hidden_size": settings.hidden_size,  # the merger projects into the LLM's width
            "num_heads": settings.vision_heads,
            "mlp_ratio": 2,
            "patch_size": settings.patch_size,
            "spatial_merge_size": SPATIAL_MERGE,
            "temporal_patch_size": TEMPORAL_PATCH,
        },
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


def build_backbone(settings: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Qwen2VLModel:
    """A randomly initialised backbone of the configured sizes, or the local checkpoint."""
    import torch

    if settings.checkpoint:
        path = Path(settings.checkpoint)
        if not (path / "config.json").is_file():
            raise UserError(f"model.checkpoint {path} has no config.json: point it at a local Qwen2-VL directory")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, config=config, local_files_only=True, attn_implementation=settings.attn_implementation)
    else:
        torch.manual_seed(seed)
        model = Qwen2VLModel._from_config(tiny_config(settings, tokenizer), attn_implementation=settings.attn_implementation)
    set_bidirectional(model, settings.bidirectional)
    return model


def set_bidirectional(model: Qwen2VLModel, bidirectional: bool) -> None:
    """Bidirectional attention for embedding, causal for next-token pretraining."""
    model.language_model.config.is_causal = not bidirectional


def grid_side(settings: ModelConfig) -> int:
    """Patches per image side; the side must split into whole 2x2 merge blocks."""
    side = settings.image_size // settings.patch_size
    if side * settings.patch_size != settings.image_size or side % SPATIAL_MERGE:
        raise UserError(
            f"model.image_size={settings.image_size} must be a multiple of "
            f"{SPATIAL_MERGE} x model.patch_size={settings.patch_size}"
        )
    return side
