"""Pretraining examples from the catalogue: an item's image, a question, and the answer to learn.

Four tasks (MOON's domain-knowledge injection), each asked about the item's main image:

- title: the item's title;
- attributes: every attribute as "name: value", in the item's order;
- category: the category path, root to leaf ("Shoes > Boots > Ankle Boots");
- subject: the main subject, built from the leaf category and the key attributes
  that the image shows ("burgundy rubber ankle boots").

An item gives one example per task it has something to say for. A seeded share of the
SPUs is held out (all their SKUs: variants share titles and images), never trained on,
to measure what pretraining generalises.

`PretrainCollator` builds `[vision tokens] + prompt + answer + eos` with labels set on
the answer and the eos only, so the loss never rewards predicting the prompt or the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from moon.model.generative import IGNORE
from moon.model.inputs import Collator, Input
from moon.model.tokenizer import IMAGE_PAD

TASKS = ("title", "attributes", "category", "subject")
PROMPTS = {
    "title": "Q: what is the title of this product? A:",
    "attributes": "Q: what are the attributes of this product? A:",
    "category": "Q: which category is this product in? A:",
    "subject": "Q: what is the main subject of this image? A:",
}
# attributes an image shows, in the order an adjective phrase puts them
SUBJECT_ATTRIBUTES = ("colour", "color", "pattern", "material")


@dataclass(frozen=True)
class Example:
    row: int  # the item's row in the items table (where its image is)
    task: str
    answer: str

    @property
    def prompt(self) -> str:
        return PROMPTS[self.task]


def answers(title: str, category: Sequence[str], attributes) -> dict[str, str]:
    """What each task answers for one item; a task with nothing to say is left out."""
    pairs = [(key, value) for key, value in (attributes.items() if isinstance(attributes, dict) else attributes or ()) if value]
    category = [part for part in category or () if part]
    found = {
        "title": (title or "").strip(),
        "attributes": "; ".join(f"{key}: {value}" for key, value in pairs),
        "category": " > ".join(category),
        "subject": subject(category[-1] if category else "", dict(pairs)),
    }
    return {task: text for task, text in found.items() if text}


def subject(leaf: str, attributes: dict[str, str]) -> str:
    """"red cotton midi dresses": the key visible attributes before the leaf category's noun."""
    if not leaf:
        return ""
    words = [attributes[key] for key in SUBJECT_ATTRIBUTES if attributes.get(key)]
    return " ".join([*words, leaf.lower()])


def build_examples(items: pa.Table, rows: Sequence[int], tasks: Sequence[str]) -> list[Example]:
    """Examples of the given item rows, item by item, tasks in `tasks` order."""
    columns = items.select(["title", "category", "attributes"]).take(pa.array(rows, type=pa.int64())).to_pydict()
    examples = []
    for row, title, category, attributes in zip(rows, columns["title"], columns["category"], columns["attributes"]):
        said = answers(title, category, attributes)
        examples.extend(Example(int(row), task, said[task]) for task in tasks if task in said)
    return examples


def split_items(items: pa.Table, seed: int, heldout_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): a seeded share of SPUs, at least one, is held out whole."""
    spus = np.asarray(items.column("spu_id").to_pylist(), dtype=object)
    unique = np.unique(spus)
    count = min(len(unique) - 1, max(1, round(heldout_share * len(unique))))
    heldout = np.random.default_rng([seed, 0x9E1D]).choice(unique, size=count, replace=False)
    is_heldout = np.isin(spus, heldout)
    return np.flatnonzero(~is_heldout), np.flatnonzero(is_heldout)


def example_texts(examples: Sequence[Example]) -> list[str]:
    """Every text the model will read, for training a tokenizer."""
    return [f"{example.prompt} {example.answer}" for example in examples]


class PretrainCollator:
    """Examples -> Qwen2-VL tensors with `labels` (IGNORE except on answer tokens and eos)."""

    def __init__(self, collator: Collator, images: pa.ChunkedArray | pa.Array, max_answer_tokens: int):
        self.collator = collator
        self.tokenizer = collator.tokenizer
        self.images = images  # the items table's image column: a batch takes its rows, nothing is copied
        self.max_answer_tokens = max_answer_tokens

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        images = self.images.take(pa.array([e.row for e in examples], type=pa.int64())).to_pylist()
        # the embedder's collator makes the image tokens, the prompt tokens and the pixels
        prompted = self.collator([Input(text=e.prompt, image=image) for e, image in zip(examples, images)])
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompted["input_ids"], prompted["attention_mask"])]
        # a leading space: the answer tokenises as it does after the prompt's last word
        answer_ids = self.tokenizer([" " + e.answer for e in examples], add_special_tokens=False)["input_ids"]
        sequences, labels = [], []
        for prompt, answer in zip(prompts, answer_ids):
            # a cut answer gets no eos: the model must not learn to stop mid-answer
            target = answer[: self.max_answer_tokens] + ([self.tokenizer.eos_token_id] if len(answer) <= self.max_answer_tokens else [])
            sequences.append(prompt + target)
            labels.append([IGNORE] * len(prompt) + target)
        batch = self.collator.pad(sequences)  # right padding, as the embedder pads
        batch["labels"] = torch.full_like(batch["input_ids"], IGNORE)
        for row, label in enumerate(labels):
            batch["labels"][row, : len(label)] = torch.tensor(label)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.collator.ids[IMAGE_PAD]).int()
        batch["pixel_values"], batch["image_grid_thw"] = prompted["pixel_values"], prompted["image_grid_thw"]
        return batch
