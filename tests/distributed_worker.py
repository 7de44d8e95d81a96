"""Run by tests/test_distributed.py under `torchrun`: one contrastive step with spatial negatives.

Every rank embeds its shard of queries and items, gathers both from all ranks (gradient
kept for its own shard), computes the full-batch InfoNCE and steps through DDP. The loss
is scaled by the world size because DDP averages gradients over ranks while each rank
holds only its own shard's share of the full-batch gradient.
"""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from moon.train.losses import info_nce
from moon.train.negatives import gather_from_ranks

BATCH, DIM = 8, 16


def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(DIM, DIM)


def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, DIM, generator=generator), torch.randn(BATCH, DIM, generator=generator)


def main(out: str) -> None:
    # A collective that waits on a rank that died fails within a minute, with its error, instead of
    # hanging until the test's own timeout kills torchrun and leaves this rank behind.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(encoder())
    queries, items = data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    q = gather_from_ranks(F.normalize(model(queries[shard]), dim=-1))
    c = gather_from_ranks(F.normalize(model(items[shard]), dim=-1))
    loss = info_nce(q, c, 0.1).mean()
    (loss * world).backward()
    if rank == 0:
        grads = {name: p.grad.tolist() for name, p in model.module.named_parameters()}
        with open(out, "w") as handle:
            json.dump({"loss": loss.item(), "grads": grads, "negatives": len(c) - 1}, handle)
    dist.barrier()  # no rank leaves while another still talks to it


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip gloo's teardown and the interpreter's: after the barrier every rank has done and
    # written its work, and tearing gloo down can abort or block a rank whose peer has gone.
    os._exit(0)
