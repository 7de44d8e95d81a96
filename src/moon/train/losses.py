"""Contrastive losses of MOON's post-training: InfoNCE with false-negative masking, per-task
temperatures, the Matryoshka wrapper that applies a loss at every configured dimension, and
`PosttrainLoss`, which puts them together with the descriptor distillation into one step's loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moon.errors import UserError
from moon.model.embedder import Embedder
from moon.train.distill import DescriptorDistillation


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
        total = total + weight * loss(Embedder.truncate(queries, dim), Embedder.truncate(candidates, dim))
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


@dataclass
class LossParts:
    """What a post-training loss is made of, detached, for the log."""

    total: torch.Tensor  # the loss, unscaled
    per_pair: torch.Tensor  # (B,) each pair's InfoNCE at the full dimension
    distill: torch.Tensor | None  # the distillation loss, None without distillation


class PosttrainLoss(torch.nn.Module):
    """The loss of a post-training step: per-task-temperature InfoNCE weighted by pair and task,
    summed over the Matryoshka dimensions, plus the weighted descriptor distillation.

    `dims` are the Matryoshka dimensions in the order of `dim_weights` (null: equal weights);
    the largest is the embeddings' full width. The temperatures and the distillation head are
    the module's parameters: the recipe trains them beside the embedder.
    """

    def __init__(
        self,
        temperatures: TaskTemperatures,
        dims: Sequence[int],
        dim_weights: Sequence[float] | None = None,
        task_weights: Mapping[str, float] | None = None,
        distillation: DescriptorDistillation | None = None,
        distill_weight: float = 0.0,
        symmetric: bool = False,
    ):
        super().__init__()
        self.dims = list(dims)
        self.dim_weights = list(dim_weights) if dim_weights else [1.0] * len(self.dims)
        if len(self.dim_weights) != len(self.dims):
            raise UserError(f"matryoshka_weights needs one weight per dimension {self.dims}")
        self.full_dim = max(self.dims)
        self.temperatures = temperatures
        self.distillation = distillation
        self.task_weights = dict(task_weights or {})
        self.distill_weight = distill_weight
        self.symmetric = symmetric

    def forward(
        self,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        positives: torch.Tensor,
        tasks: Sequence[str],
        pair_weights: torch.Tensor,
        false_negatives: torch.Tensor,
        distill_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LossParts]:
        """The loss and its parts. Row i of `queries` (B, d) has `candidates[i]` as its positive;
        `positives` are the B in-batch positives (the first rows of `candidates`), distilled with
        the queries toward `distill_targets` (2B,): each query's catalogue row, then each positive's."""
        if queries.shape[1] != self.full_dim:
            raise ValueError(f"embeddings of {queries.shape[1]} dimensions, expected {self.full_dim}")
        temperature = self.temperatures(tasks)
        weights = pair_weights * torch.tensor([self.task_weights.get(t, 1.0) for t in tasks], device=pair_weights.device)
        value, full = 0.0, None
        for dim, dim_weight in zip(self.dims, self.dim_weights):
            per_pair = info_nce(Embedder.truncate(queries, dim), Embedder.truncate(candidates, dim),
                                temperature, false_negatives, self.symmetric)
            value = value + dim_weight * ((per_pair * weights).sum() / weights.sum())
            if dim == self.full_dim:
                full = per_pair.detach()
        distilled = None
        if self.distillation is not None:
            distilled = self.distillation(torch.cat([queries, positives]), distill_targets)
            value = value + self.distill_weight * distilled
            distilled = distilled.detach()
        return value, LossParts(value.detach(), full, distilled)
