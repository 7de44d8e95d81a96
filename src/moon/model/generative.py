"""The generative model of MOON's pretraining: Qwen2-VL with its language-model head, causal.

Pretraining teaches the backbone e-commerce knowledge by next-token prediction, so the
model here is the library's `Qwen2VLForConditionalGeneration` (the backbone of
`backbone.py` plus an LM head), with causal attention. It is built from the tiny
`ModelConfig` sizes with seeded random weights, or loaded from `model.checkpoint`.

Precision: with `model.dtype=bfloat16` the forward and backward run under bf16 autocast
while trained weights keep float32 master copies (pure bf16 AdamW loses small updates);
weights that LoRA freezes are stored in bf16, which is what makes LoRA cheap.

A saved model is a plain Qwen2-VL generative checkpoint plus our tokenizer and
`moon_model.json`: `Embedder.load` reads its backbone (the LM head is left unused), and
`model.checkpoint` can point at it to continue generative training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2VLForConditionalGeneration

from moon.config import ModelConfig
from moon.errors import UserError
from moon.model.backbone import (
    RotaryPositions,
    base_model,
    grid_side,
    merged,
    prepare_for_training,
    set_bidirectional,
    tiny_config,
)
from moon.model.embedder import save_model_dir
from moon.model.inputs import Collator

IGNORE = -100  # label of a token that is not predicted (prompt, image, padding)


def build_generative(settings: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> torch.nn.Module:
    """The generative model, causal, with the configured precision, checkpointing and LoRA.

    Returns a `Qwen2VLForConditionalGeneration`, or a peft model wrapping one when
    `model.lora_rank > 0` (only the adapters are then trainable).
    """
    model = _load_or_init(settings, tokenizer, seed)
    set_bidirectional(model.model, False)  # next-token prediction needs causal attention
    return prepare_for_training(model, settings)


def _load_or_init(settings: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int):
    if settings.checkpoint:
        path = Path(settings.checkpoint)
        if not (path / "config.json").is_file():
            raise UserError(f"model.checkpoint {path} has no config.json: point it at a local Qwen2-VL directory")
        model = Qwen2VLForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=torch.float32, attn_implementation=settings.attn_implementation
        )
    else:
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration._from_config(
            tiny_config(settings, tokenizer), attn_implementation=settings.attn_implementation, dtype=torch.float32
        )
    grid_side(settings.model_copy(update={"patch_size": model.config.vision_config.patch_size}))
    return model


class AnswerLoss(torch.nn.Module):
    """Next-token cross-entropy on answer tokens only, per example.

    Logits are computed only where a label is set, so a large vocabulary costs memory
    for answer tokens alone. Wrapping the model in this module lets DDP see one forward.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.positions = RotaryPositions(base_model(model).model)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, predicted tokens) per example, float32."""
        generative = base_model(self.model)
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        hidden = generative.model(**inputs, position_ids=self.positions(inputs), use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]  # the token at t+1 is predicted from position t
        scored = targets != IGNORE
        logits = generative.lm_head(hidden[:, :-1][scored]).float()
        token_loss = torch.nn.functional.cross_entropy(logits, targets[scored], reduction="none")
        rows = scored.nonzero()[:, 0]
        sums = torch.zeros(len(targets), device=hidden.device).index_add(0, rows, token_loss)
        return sums, scored.sum(1)


def save_generative(model, tokenizer: PreTrainedTokenizerBase, settings: ModelConfig, path: str | Path) -> Path:
    """Writes a directory that `Embedder.load` (backbone) and `build_generative` (whole model) read.

    LoRA adapters are merged first, so the model can no longer train afterwards.
    """
    # the embedder's own attention choice is kept: post-training embeds bidirectionally
    return save_model_dir(path, merged(model), tokenizer, settings)


def make_collator(model, tokenizer: PreTrainedTokenizerBase, settings: ModelConfig) -> Collator:
    """The embedder's input collator, for the generative model's vision settings."""
    vision = base_model(model).config.vision_config
    return Collator(tokenizer, vision, settings.image_size, settings.max_text_tokens)
