"""Negative sources beyond the batch: spatial (item embeddings of every rank) and temporal
(a FIFO queue of item embeddings from past steps)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_from_ranks(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order; gradient flows only into this rank's own rows.

    Gathered copies are detached and the local slot is put back as the live tensor, so
    each rank back-propagates exactly its own shard (no gradient summed across ranks).
    Gather the queries as well and compute the full-batch loss on every rank; under DDP,
    which averages gradients over ranks, scale that loss by the world size to get the
    single-process gradient (tests/test_distributed.py checks this with two processes).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def gather_uneven(local: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's rows (detached), in rank order, when ranks hold different numbers of rows
    (hard negatives); `total` is the number all ranks hold together."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)], device=local.device))
    width = max(int(s) for s in sizes)
    padded = torch.zeros(width, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    gathered = torch.cat([part[: int(size)] for part, size in zip(parts, sizes)])
    assert len(gathered) == total, (len(gathered), total)
    return gathered


class EmbeddingQueue:
    """Item embeddings of past steps (detached), with the integer keys that identify their
    product (e.g. item, SPU and near-duplicate group codes) for false-negative masking.

    Holds at most `size` rows; rows older than `max_age` steps are not served.
    """

    def __init__(self, size: int, max_age: int):
        self.size, self.max_age = size, max_age
        self.embeddings: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.steps = torch.empty(0, dtype=torch.long)

    def push(self, embeddings: torch.Tensor, keys: torch.Tensor, step: int) -> None:
        if self.size == 0:
            return
        new, keys = embeddings.detach(), torch.as_tensor(keys)
        self.embeddings = new if self.embeddings is None else torch.cat([self.embeddings, new])[-self.size :]
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys])[-self.size :]
        self.steps = torch.cat([self.steps, torch.full((len(keys),), step)])[-self.size :]

    def get(self, step: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The embeddings still young enough at `step`, and their keys."""
        if self.embeddings is None:
            return None, None
        fresh = (step - self.steps) <= self.max_age
        return self.embeddings[fresh], self.keys[fresh]

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings, "keys": self.keys, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings, self.keys, self.steps = state["embeddings"], state["keys"], state["steps"]

    def __len__(self) -> int:
        return len(self.steps)
