"""The non-learned baseline embedder every MOON model is measured against."""

from moon.baseline.embedder import BaselineEmbedder

__all__ = ["BaselineEmbedder"]
