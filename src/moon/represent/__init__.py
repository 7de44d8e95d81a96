"""Representation production: the catalogue and the log's queries embedded into versions of the
representation store, by a trained model (`batch`, `encoders`) or without one (`controls`)."""

from moon.represent.batch import embed_catalogue

__all__ = ["embed_catalogue"]
