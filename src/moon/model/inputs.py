"""Model inputs from MOON's views: text, image, or text+image, batched for Qwen2-VL.

An input is one sequence: `<|vision_start|>` + one `<|image_pad|>` per merged patch +
`<|vision_end|>` when it has an image, then its text (truncated on its own, so an image
is never cut). Images are resized to a square and patchified exactly as Qwen2-VL's image
processor does (CLIP normalisation, a still frame repeated over the temporal patch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from moon.io.images import decode
from moon.model.tokenizer import IMAGE_PAD, VISION_END, VISION_START

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


@dataclass(frozen=True)
class Input:
    """One query or item in some view: a text, an image (encoded bytes or PIL), or both."""

    text: str | None = None
    image: bytes | Image.Image | None = None


class Collator:
    """Turns a list of `Input`s into the tensors a Qwen2-VL forward pass takes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vision_config, image_size: int, max_text_tokens: int):
        self.tokenizer = tokenizer
        self.patch = vision_config.patch_size
        self.merge = vision_config.spatial_merge_size
        self.temporal = vision_config.temporal_patch_size
        self.image_size = image_size
        self.max_text_tokens = max_text_tokens
        self.ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (VISION_START, VISION_END, IMAGE_PAD)}
        side = image_size // self.patch
        self.image_tokens = (side // self.merge) ** 2

    def __call__(self, inputs: Sequence[Input]) -> dict[str, torch.Tensor]:
        texts = [item.text or "" for item in inputs]
        text_ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_text_tokens)["input_ids"]
        sequences, images = [], []
        for item, ids in zip(inputs, text_ids):
            prefix = []
            if item.image is not None:
                images.append(item.image)
                prefix = [self.ids[VISION_START], *[self.ids[IMAGE_PAD]] * self.image_tokens, self.ids[VISION_END]]
            sequences.append(prefix + list(ids) or [self.tokenizer.pad_token_id])
        batch = self.pad(sequences)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.ids[IMAGE_PAD]).int()
        if images:
            batch["pixel_values"], batch["image_grid_thw"] = self.patchify(images)
        return batch

    def pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def patchify(self, images: Sequence[bytes | Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (patches, C*T*p*p) and image_grid_thw (images, 3), as Qwen2-VL expects."""
        p, m, t = self.patch, self.merge, self.temporal
        side = self.image_size // p
        pixels = torch.stack([self._pixels(image) for image in images])  # (n, C, H, W)
        n, c = pixels.shape[:2]
        pixels = (pixels - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]
        blocks = pixels.reshape(n, c, side // m, m, p, side // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        blocks = blocks.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
        values = blocks.reshape(n * side * side, c * t * p * p)
        grid = torch.tensor([[1, side, side]] * n)
        return values, grid

    def _pixels(self, image: bytes | Image.Image) -> torch.Tensor:
        image = decode(image).resize((self.image_size, self.image_size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
