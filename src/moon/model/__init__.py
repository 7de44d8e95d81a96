"""The MOON backbone (a Qwen2-VL multimodal LLM) and the `Embedder` built on it."""

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()  # MOON shows its own progress (silenced by --quiet)
