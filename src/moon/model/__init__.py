"""The MOON backbone (a Qwen2-VL multimodal LLM) and the `Embedder` built on it."""
