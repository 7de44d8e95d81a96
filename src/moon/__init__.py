"""MOON: multimodal representation learning for e-commerce search advertising."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`moon.load` (see `moon.api`), imported on first use: `import moon` stays free of torch."""
    if name == "load":
        from moon.api import load

        return load
    raise AttributeError(f"module 'moon' has no attribute {name!r}")
