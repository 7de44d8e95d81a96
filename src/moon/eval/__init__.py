"""Evaluation: retrieval metrics (recall@K with bootstrap confidence intervals) on any model's vectors."""
