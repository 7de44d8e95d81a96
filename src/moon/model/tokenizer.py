"""Tokenizers: a checkpoint's own, or a byte-level BPE trained locally on catalogue and query text.

Nothing is downloaded: a model without a checkpoint gets a tokenizer trained here, with
the special tokens Qwen2-VL's vision input needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS = "<|endoftext|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [PAD, "<|im_start|>", EOS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes, nothing is unknown) trained on the given texts."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator((text for text in texts if text), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=EOS)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved with `save_pretrained` (ours, or a checkpoint's), from a local directory only."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (PAD, EOS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)}
    missing = [token for token, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the Qwen2-VL special tokens {missing}")
    return ids
