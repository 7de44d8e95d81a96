"""Contrastive losses of MOON's post-training: InfoNCE with false-negative masking, per-task
temperatures, and the Matryoshka wrapper that applies a loss at every configured dimension."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def info_nce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    temperature: torch.Tensor | float,
    false_negatives: torch.Tensor | None = None,
    symmetric: bool = False,
) -> torch.Tensor:
    """Per-query InfoNCE loss. Row i's positive is candidates[i]; every other candidate is a
    negative unless `false_negatives[i, j]` says it is the same product (same item, SPU or
    near-duplicate group), in which case it is left out of the softmax.

    queries (B, d) and candidates (N >= B, d) are L2-normalised; temperature is a scalar
    or a (B,) tensor (one per query, e.g. by task). `symmetric` adds, per pair, the loss of
    its positive finding its query among the batch's queries (as CLIP does), halved with
    the forward loss; extra candidates (hard, queued) take no part in that direction.
    """
    batch = queries.shape[0]
    logits = queries @ candidates.T
    temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    logits = logits / (temperature.reshape(-1, 1) if temperature.ndim else temperature)
    if false_negatives is not None:
        keep_positive = torch.zeros_like(false_negatives)
        keep_positive[torch.arange(batch), torch.arange(batch)] = True
        logits = logits.masked_fill(false_negatives & ~keep_positive, float("-inf"))
    targets = torch.arange(batch, device=logits.device)
    forward = F.cross_entropy(logits, targets, reduction="none")
    if not symmetric:
        return forward
    # Column j of the in-batch block scores positive j against every query; the masks are
    # symmetric there because false negatives are defined between products.
    backward = F.cross_entropy(logits[:, :batch].T, targets, reduction="none")
    return (forward + backward) / 2


def matryoshka(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    queries: torch.Tensor,
    candidates: torch.Tensor,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """The weighted sum of `loss` on the re-normalised prefixes of every Matryoshka dimension."""
    weights = weights or [1.0] * len(dims)
    total = 0.0
    for dim, weight in zip(dims, weights):
        total = total + weight * loss(F.normalize(queries[:, :dim], dim=-1), F.normalize(candidates[:, :dim], dim=-1))
    return total


class TaskTemperatures(torch.nn.Module):
    """One temperature per task, learnable (through its logarithm, so it stays positive) or fixed."""

    def __init__(self, tasks: Sequence[str], initial: float = 0.05, learnable: bool = True):
        super().__init__()
        self.index = {task: i for i, task in enumerate(tasks)}
        log_t = torch.full((len(tasks),), math.log(initial))
        if learnable:
            self.log_temperature = torch.nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def forward(self, tasks: Sequence[str]) -> torch.Tensor:
        """The temperature of each row's task, (B,)."""
        rows = torch.tensor([self.index[task] for task in tasks], device=self.log_temperature.device)
        return self.log_temperature.exp()[rows]

    def values(self) -> dict[str, float]:
        return {task: float(self.log_temperature[i].detach().exp()) for task, i in self.index.items()}
