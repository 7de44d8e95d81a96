"""Versioned representation store and the vector index over it."""
