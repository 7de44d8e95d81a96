"""Distilling the baseline's image descriptor into the embedder while post-training.

A pretrained Qwen2-VL brings years of visual knowledge to MOON's post-training; a tiny
backbone from random initialisation brings none, and behaviour pairs alone teach it to
tell a shopper's photo from a catalogue image very slowly. The non-learned baseline
(`moon.baseline.embedder`) already knows one thing well: the colour and texture of the
product in the middle of an image. This loss hands that knowledge to the embedder.

A linear head maps an embedding into the descriptor space, and the loss asks which
catalogue item it shows: a softmax over the descriptors of every catalogue image (fixed
prototypes, computed once), the target being the item pictured. Two kinds of embedding
are taught: shoppers' photos (and augmented catalogue images) toward the descriptor of
their item's clean catalogue image, which teaches invariance to clutter, light and
framing that the baseline lacks; and items shown with their image, toward their own,
which keeps both sides of a search in one space. The head is dropped when the embedder
is published: it only shapes the embedding.

Every query is compared with all catalogue items, so the cost grows with the catalogue
((batch x items) logits per step): cheap up to a few hundred thousand items. A real
pretrained checkpoint has better visual features than the descriptor, so turn the loss
off there (`distill_weight: 0`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moon import ui
from moon.baseline.descriptor import image_descriptors

NO_TARGET = -1  # an embedding that shows no catalogue image (a text query, a text-only item view)


class DescriptorDistillation(torch.nn.Module):
    """The head and the loss; `prototypes` (items, descriptor dims) are the catalogue's descriptors."""

    def __init__(self, prototypes: torch.Tensor, dim: int, temperature: float, seed: int = 0):
        super().__init__()
        self.register_buffer("prototypes", prototypes, persistent=False)  # recomputed from the catalogue, not saved
        self.temperature = temperature
        with torch.random.fork_rng(devices=[]):  # the same head on every rank, whatever ran before
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(dim, prototypes.shape[1])

    @classmethod
    def for_catalogue(cls, images: list[bytes], dim: int, temperature: float, seed: int = 0,
                      advance: ui.Advance | None = None) -> DescriptorDistillation:
        """The head over the descriptors of every catalogue image; `advance(n)` reports the images described."""
        prototypes = torch.from_numpy(image_descriptors(images, advance))
        return cls(prototypes, dim, temperature, seed)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the embeddings with a target row; 0 when none has one."""
        shown = targets != NO_TARGET
        if not shown.any():
            return embeddings.sum() * 0.0  # keeps the graph whole for DDP
        projected = F.normalize(self.head(embeddings[shown].float()), dim=-1)
        logits = projected @ self.prototypes.T / self.temperature
        return F.cross_entropy(logits, targets[shown])


def targets(rows: np.ndarray, shows_image: np.ndarray) -> np.ndarray:
    """The catalogue row each embedding should be identified as, NO_TARGET where it shows no image."""
    return np.where(shows_image, rows, NO_TARGET)
