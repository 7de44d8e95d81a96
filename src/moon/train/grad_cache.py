"""GradCache: a contrastive step over a batch far larger than fits in memory, with the same
gradients as the full batch.

1. Embed every chunk without a graph and keep only the embeddings.
2. Compute the loss on the full batch of embeddings and back-propagate to them.
3. Re-embed each chunk with a graph (same random state as in step 1) and push the cached
   embedding gradients through it, one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch


def grad_cache_step(
    encode: Callable[[object], torch.Tensor],
    chunks: Sequence[Sequence[object]],
    loss: Callable[..., torch.Tensor],
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """`chunks[k]` are the model inputs of the k-th tower (e.g. queries, items), already split
    into sub-batches; `loss` takes one full embedding tensor per tower. Gradients accumulate in
    the model's parameters (and in any tensor `loss` closes over); returns the loss (detached).

    Under DDP pass the wrapper's `no_sync`: gradients are then all-reduced once, in the
    backward pass of the last chunk, instead of after every chunk."""
    states, towers = [], []
    with torch.no_grad():
        for tower in chunks:
            tower_states, parts = [], []
            for chunk in tower:
                tower_states.append(_random_state())
                parts.append(encode(chunk))
            states.append(tower_states)
            towers.append(torch.cat(parts).requires_grad_(True))
    value = loss(*towers)
    value.backward()
    last = (len(chunks) - 1, len(chunks[-1]) - 1)
    for t, (tower, tower_states, full) in enumerate(zip(chunks, states, towers)):
        start = 0
        for c, (chunk, state) in enumerate(zip(tower, tower_states)):
            _set_random_state(state)
            with nullcontext() if (t, c) == last else no_sync():
                embeddings = encode(chunk)
                embeddings.backward(full.grad[start : start + len(embeddings)])
            start += len(embeddings)
    return value.detach()


def _random_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_random_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
