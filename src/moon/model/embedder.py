"""The MOON embedder: the backbone's output tokens, mask-aware mean pooled and L2-normalised.

With bidirectional attention every token sees every other, and the representation of
an input is the mean of all its output tokens (padding excluded). Matryoshka dimensions
are prefixes of the full vector, re-normalised, so one stored vector serves every dim.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moon import ui
from moon.config import ModelConfig
from moon.errors import UserError
from moon.model.backbone import RotaryPositions, autocast, build_backbone, grid_side, merged
from moon.model.inputs import Batches, Collator, Input, prepared_ahead
from moon.model.tokenizer import load_tokenizer, train_tokenizer

SETTINGS_FILE = "moon_model.json"


class Embedder(torch.nn.Module):
    def __init__(self, backbone, tokenizer, settings: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings
        vision = backbone.config.vision_config
        grid_side(settings.model_copy(update={"patch_size": vision.patch_size}))  # image size fits the patches
        self.collate = Collator(tokenizer, vision, settings.image_size, settings.max_text_tokens)
        self.positions = RotaryPositions(backbone)
        self.dim = backbone.config.text_config.hidden_size
        unusable = [d for d in settings.matryoshka_dims if not 0 < d <= self.dim]
        if unusable:
            raise UserError(f"model.matryoshka_dims {unusable} must lie in 1..{self.dim} (the hidden size)")

    @classmethod
    def create(cls, settings: ModelConfig, corpus: Iterable[str] = (), seed: int = 0) -> Embedder:
        """A new embedder: the checkpoint's tokenizer and weights, or a tokenizer trained on `corpus`
        and a randomly initialised backbone of the configured sizes."""
        if settings.checkpoint:
            tokenizer = load_tokenizer(settings.checkpoint)
        else:
            tokenizer = train_tokenizer(corpus, settings.vocab_size)
        return cls(build_backbone(settings, tokenizer, seed), tokenizer, settings)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full-dimension embeddings, L2-normalised: the mean of all output tokens, padding excluded."""
        hidden = self.backbone(**batch, position_ids=self.positions(batch), use_cache=False).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled.float(), dim=-1)  # float32 for the loss, whatever the compute dtype

    @staticmethod
    def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
        """The Matryoshka prefix of `dim` dimensions, re-normalised."""
        return F.normalize(embeddings[..., :dim], dim=-1)

    def encode(self, inputs: Sequence[Input], dim: int | None = None, batch_size: int = 32,
               advance: ui.Advance | None = None) -> np.ndarray:
        """Embeddings of any views, in batches, without gradients, on the model's device and in its
        compute dtype; float32 (n, dim or full). `advance(n)` reports progress to the caller's bar."""
        dim = dim or self.dim
        if dim not in (*self.settings.matryoshka_dims, self.dim):
            raise UserError(f"dim={dim} is not a trained Matryoshka dimension {self.settings.matryoshka_dims}")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = np.empty((len(inputs), dim), dtype=np.float32)
        batches = Batches(inputs, batch_size, self.collate)
        workers = -1 if len(batches) > 2 else 0  # a worker process pays for its start over a few batches
        with torch.inference_mode(), autocast(self.settings, device):
            for start, batch in zip(range(0, len(inputs), batch_size), prepared_ahead(batches, device, workers=workers)):
                embeddings = self.truncate(self({key: value.to(device) for key, value in batch.items()}), dim)
                out[start : start + len(embeddings)] = embeddings.float().cpu().numpy()
                if advance:
                    advance(len(embeddings))
        self.train(was_training)
        return out

    def save(self, path: str | Path) -> Path:
        """Writes the backbone (LoRA adapters merged in), the tokenizer and the settings."""
        self.backbone = merged(self.backbone)
        return save_model_dir(path, self.backbone, self.tokenizer, self.settings)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> Embedder:
        """A saved embedder exactly as it was saved: its attention, dimensions and served view come
        from its own `moon_model.json`, never from the loading run's config, so the same weights
        give the same vectors whoever loads them. On `device` (default: CPU), in eval mode."""
        path = Path(path)
        if not (path / SETTINGS_FILE).is_file():
            raise UserError(f"{path} is not a MOON model directory (it has no {SETTINGS_FILE})")
        settings = ModelConfig.model_validate(json.loads((path / SETTINGS_FILE).read_text()))
        settings = settings.model_copy(update={"checkpoint": str(path)})
        tokenizer = load_tokenizer(path)
        embedder = cls(build_backbone(settings, tokenizer), tokenizer, settings)
        return embedder.to(device or "cpu").eval()


def save_model_dir(path: str | Path, model, tokenizer, settings: ModelConfig) -> Path:
    """A directory `Embedder.load` reads: Hugging Face weights and tokenizer plus `moon_model.json`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / SETTINGS_FILE).write_text(json.dumps(settings.model_dump(), indent=2) + "\n")
    return path

