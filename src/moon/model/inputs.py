"""Model inputs from MOON's views: text, image, or text+image, batched for Qwen2-VL.

An input is one sequence: `<|vision_start|>` + one `<|image_pad|>` per merged patch +
`<|vision_end|>` when it has an image, then its text (truncated on its own, so an image
is never cut). Images are resized to a square and patchified exactly as Qwen2-VL's image
processor does (CLIP normalisation, a still frame repeated over the temporal patch).

Decoding and tokenising cost about as much as a tiny model's forward pass. Training and
batch embedding therefore take their batches from `prepared_ahead`, which builds them in
worker processes a few batches ahead of the model wherever the model leaves CPU cores free,
and each process keeps the catalogue's images decoded at the model's size once seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
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


PREFETCHED = 4  # batches per worker: enough to ride out a slow one, few enough to hold little memory
MAX_INPUT_WORKERS = 8


def prepared_ahead(batches: Dataset, device: torch.device, start: int = 0, workers: int = -1) -> DataLoader:
    """`batches[start]`, `batches[start + 1]`, ... in order, prepared by `workers` processes a few
    batches ahead of the model (0: each in this process when it is asked for; -1: as many as
    `input_workers(device)`).

    Batch i must be a pure function of i (any randomness seeded by i), so the data is the same
    whatever the number of workers, and a resumed run continues it exactly.
    """
    workers = input_workers(device) if workers < 0 else workers
    return DataLoader(batches, batch_size=None, sampler=range(start, len(batches)), num_workers=workers,
                      prefetch_factor=PREFETCHED if workers else None)


def input_workers(device: torch.device) -> int:
    """One input worker per CPU core that the model leaves free, at most 8.

    A model on an accelerator leaves all but one core per process free. A model on the CPU
    already computes on every core (PyTorch's threads): a worker there only takes turns with
    it (on 2 cores, post-training ran at 99.7 pairs/s with one worker and 99.3 without).
    """
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine
    return max(0, min(MAX_INPUT_WORKERS, cores // processes - 1))


class Batches(Dataset):
    """`inputs` in consecutive batches of `batch_size`, each collated when it is asked for."""

    def __init__(self, inputs: Sequence[Input], batch_size: int, collate: Collator):
        self.inputs, self.batch_size, self.collate = inputs, batch_size, collate

    def __len__(self) -> int:
        return math.ceil(len(self.inputs) / self.batch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.collate(self.inputs[index * self.batch_size : (index + 1) * self.batch_size])


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
        pixels = np.stack([self._pixels(image) for image in images])  # (n, H, W, C) uint8
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        n, c = pixels.shape[:2]
        pixels = (pixels - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]
        blocks = pixels.reshape(n, c, side // m, m, p, side // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        blocks = blocks.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
        values = blocks.reshape(n * side * side, c * t * p * p)
        grid = torch.tensor([[1, side, side]] * n)
        return values, grid

    def _pixels(self, image: bytes | Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 at the model's image size."""
        if isinstance(image, bytes):
            return _resized_once(image, self.image_size)
        return _resized(image, self.image_size)


CACHED_IMAGES = 4096  # per process, each image_size^2 x 3 bytes (12 KiB at 64 pixels)


@lru_cache(CACHED_IMAGES)
def _resized_once(data: bytes, size: int) -> np.ndarray:
    """Encoded images recur (a catalogue item is the positive of many pairs): each process decodes
    and resizes one once. The array is shared by every caller, so it is read-only."""
    pixels = _resized(data, size)
    pixels.flags.writeable = False
    return pixels


def forget_images() -> None:
    """Empties this process's cache of resized images (a benchmark measures a first pass)."""
    _resized_once.cache_clear()


def _resized(image: bytes | Image.Image, size: int) -> np.ndarray:
    image = decode(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image)
