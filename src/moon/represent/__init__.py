"""Representation production: the catalogue embedded into versions of the representation store."""

from moon.represent.batch import embed_catalogue

__all__ = ["embed_catalogue"]
