"""MOON: multimodal representation learning for e-commerce search advertising."""

__version__ = "0.1.0"
