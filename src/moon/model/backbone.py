"""The backbone: a Qwen2-VL model (vision encoder -> merger -> LLM) from `transformers`.

Without a checkpoint it is built from the sizes in `ModelConfig` with random weights
(the tiny default trains on two CPU cores); with `model.checkpoint` it loads a local
Qwen2-VL or Qwen2.5-VL directory. Attention is switched between causal (generative
pretraining) and bidirectional (embedding) through the LLM config's `is_causal`, which
the library applies both to the mask and to the attention kernel.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerBase, Qwen2VLConfig, Qwen2VLModel
from transformers.utils import logging as hf_logging

from moon.config import ModelConfig
from moon.errors import UserError
from moon.model.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, special_ids
from moon.model.vision_attention import batch_same_size_images

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
    if settings.checkpoint:
        path = Path(settings.checkpoint)
        if not (path / "config.json").is_file():
            raise UserError(f"model.checkpoint {path} has no config.json: point it at a local Qwen2-VL directory")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with _quiet_transformers():  # a generative checkpoint's unused LM head is expected, not news
            model = AutoModel.from_pretrained(
                path, config=config, local_files_only=True, attn_implementation=settings.attn_implementation
            )
    else:
        torch.manual_seed(seed)
        model = Qwen2VLModel._from_config(tiny_config(settings, tokenizer), attn_implementation=settings.attn_implementation)
    set_bidirectional(model, settings.bidirectional)
    batch_same_size_images(model)
    return model


class RotaryPositions:
    """The multimodal rotary positions (3, batch, length) of a batch, for `position_ids`.

    The library computes them row by row in Python on every forward pass (about a tenth of
    the tiny model's training step on 2 CPU cores). A row's positions depend only on its
    layout: which of its tokens are image tokens, and its images' grids. So each layout is
    computed once, by the model's own `get_rope_index`, and reused. Batches whose images differ
    in grid are left to the library (None).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layouts: dict[tuple, torch.Tensor] = {}

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        grids, types = batch.get("image_grid_thw"), batch.get("mm_token_type_ids")
        if grids is None or types is None or not bool((grids == grids[0]).all()):
            return None
        kept, types, ids = batch["attention_mask"].bool().cpu(), types.cpu(), batch["input_ids"].cpu()
        grid = grids[0].cpu()
        positions = torch.zeros((3, *types.shape), dtype=torch.long)
        for row, mask in enumerate(kept):
            positions[:, row, mask] = self._layout(types[row, mask], grid, ids[row, mask])
        return positions.to(batch["input_ids"].device)

    def _layout(self, types: torch.Tensor, grid: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        key = (tuple(grid.tolist()), types.numpy().tobytes())
        if key not in self.layouts:
            images = int((torch.diff(types, prepend=types.new_zeros(1)) == 1).sum())
            positions, _ = base_model(self.model).get_rope_index(
                input_ids[None], mm_token_type_ids=types[None], image_grid_thw=grid.repeat(images, 1))
            self.layouts[key] = positions[:, 0]
        return self.layouts[key]


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


def prepare_for_training(model: torch.nn.Module, settings: ModelConfig) -> torch.nn.Module:
    """Applies the configured LoRA adapters (a peft wrapper is returned) and gradient checkpointing."""
    if settings.lora_rank > 0:
        model = _add_lora(model, settings)
    if settings.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) and never needs inputs that require grad
        base_model(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _add_lora(model, settings: ModelConfig):
    from peft import LoraConfig, get_peft_model

    # only the LLM's projections: the vision encoder has modules of other names, but a
    # user's target list could match some, and LoRA is documented as adapting the LLM
    targets = "|".join(settings.lora_targets)
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=2 * settings.lora_rank,
        target_modules=rf".*language_model.*\.({targets})",
        lora_dropout=0.0,  # no randomness: a resumed run must repeat the uninterrupted one
    )
    model = get_peft_model(model, config)
    if settings.dtype == "bfloat16":
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    return model


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Qwen2-VL model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain Qwen2-VL model with LoRA adapters merged into its weights (in place)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def autocast(settings: ModelConfig, device: torch.device):
    """bf16 compute when configured; float32 needs no context."""
    if settings.dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _quiet_transformers():
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
