"""Losses, negative sources and GradCache of MOON's post-training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moon.config import load_config
from moon.errors import UserError
from moon.model.embedder import Embedder
from moon.model.inputs import Input
from moon.train.distill import NO_TARGET, DescriptorDistillation
from moon.train.grad_cache import grad_cache_step
from moon.train.losses import PosttrainLoss, TaskTemperatures, info_nce, matryoshka
from moon.train.negatives import EmbeddingQueue, gather_from_ranks


def unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_info_nce_matches_the_softmax_by_hand():
    q = unit([[1.0, 0.0], [0.0, 1.0]])
    c = unit([[1.0, 0.1], [0.2, 1.0], [1.0, 1.0]])
    t = 0.5
    logits = (q @ c.T / t).numpy()
    expected = [-(logits[i, i] - math.log(np.exp(logits[i]).sum())) for i in range(2)]
    np.testing.assert_allclose(info_nce(q, c, t).numpy(), expected, rtol=1e-5)


def test_false_negatives_leave_the_softmax_but_the_positive_stays():
    q = unit([[1.0, 0.0], [0.0, 1.0]])
    c = unit([[1.0, 0.1], [0.2, 1.0], [1.0, 0.0]])
    mask = torch.tensor([[True, False, True], [False, True, False]])  # row 0: candidate 2 is the same product
    masked = info_nce(q, c, 0.5, mask)
    without = info_nce(q, c[:2], 0.5)
    assert torch.isclose(masked[0], without[0]) and torch.isfinite(masked).all()
    assert torch.isclose(masked[1], info_nce(q, c, 0.5)[1])


def test_per_query_temperatures_and_their_gradients():
    temps = TaskTemperatures(["text->image", "image->image"], initial=0.1)
    t = temps(["image->image", "text->image"])
    assert torch.allclose(t, torch.tensor([0.1, 0.1]))
    q, c = unit([[1.0, 0.0], [0.0, 1.0]]), unit([[1.0, 0.3], [0.3, 1.0]])
    info_nce(q, c, t).sum().backward()
    assert temps.log_temperature.grad is not None and (temps.log_temperature.grad != 0).all()
    fixed = TaskTemperatures(["a"], initial=0.07, learnable=False)
    assert not list(fixed.parameters()) and abs(fixed.values()["a"] - 0.07) < 1e-6


def test_matryoshka_sums_the_loss_at_every_prefix():
    torch.manual_seed(0)
    q, c = F.normalize(torch.randn(4, 16), dim=-1), F.normalize(torch.randn(6, 16), dim=-1)
    loss = lambda a, b: info_nce(a, b, 0.1).mean()
    expected = 1.0 * loss(F.normalize(q[:, :4], dim=-1), F.normalize(c[:, :4], dim=-1)) + 0.5 * loss(q, c)
    assert torch.isclose(matryoshka(loss, q, c, [4, 16], [1.0, 0.5]), expected)


def test_posttrain_loss_logs_each_pair_at_the_full_dimension_in_any_dimension_order():
    torch.manual_seed(0)
    q, c = F.normalize(torch.randn(4, 16), dim=-1), F.normalize(torch.randn(6, 16), dim=-1)
    tasks = ["a", "b", "a", "b"]
    same = torch.eye(4, 6, dtype=torch.bool)
    same[0, 5] = True  # candidate 5 is the same product as query 0's positive
    pair_weights = torch.tensor([1.0, 2.0, 1.0, 0.5])
    weights = pair_weights * torch.tensor([1.0, 3.0, 1.0, 3.0])  # task b weighs 3
    temperatures = TaskTemperatures(["a", "b"], initial=0.1)

    def at(dim):
        return info_nce(F.normalize(q[:, :dim], dim=-1), F.normalize(c[:, :dim], dim=-1), temperatures(tasks), same)

    full, prefix = at(16), at(4)
    expected = 0.5 * (full * weights).sum() / weights.sum() + 2.0 * (prefix * weights).sum() / weights.sum()
    assert not torch.allclose(full, prefix)
    for dims, dim_weights in (([4, 16], [2.0, 0.5]), ([16, 4], [0.5, 2.0])):
        loss = PosttrainLoss(temperatures, dims, dim_weights, {"b": 3.0})
        value, parts = loss(q, c, c[:4], tasks, pair_weights, same)
        torch.testing.assert_close(parts.per_pair, full)
        torch.testing.assert_close(value, expected)
        assert parts.total == value.detach() and parts.distill is None and value.requires_grad


def test_posttrain_loss_adds_distillation_and_trains_its_heads():
    torch.manual_seed(0)
    q, c = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    temperatures = TaskTemperatures(["a"], initial=0.1)
    distillation = DescriptorDistillation(F.normalize(torch.rand(5, 3), dim=-1), dim=8, temperature=0.1)
    loss = PosttrainLoss(temperatures, [8], distillation=distillation, distill_weight=0.25)
    targets = torch.tensor([1, NO_TARGET, 3, 4])
    same = torch.eye(2, dtype=torch.bool)
    value, parts = loss(q, c, c, ["a", "a"], torch.ones(2), same, targets)
    distilled = distillation(torch.cat([q, c]), targets)
    torch.testing.assert_close(parts.distill, distilled.detach())
    torch.testing.assert_close(value, info_nce(q, c, 0.1, same).mean() + 0.25 * distilled)
    heads = list(loss.parameters())  # what the recipe trains beside the embedder
    assert heads[0] is temperatures.log_temperature and heads[1:] == list(distillation.parameters())


def test_posttrain_loss_needs_one_weight_per_matryoshka_dimension():
    with pytest.raises(UserError, match="one weight per dimension"):
        PosttrainLoss(TaskTemperatures(["a"]), [16, 32, 64], [1.0, 0.5])


def test_queue_keeps_the_newest_rows_and_serves_only_young_ones():
    queue = EmbeddingQueue(size=5, max_age=2)
    for step in range(4):
        queue.push(torch.full((2, 3), float(step), requires_grad=True), torch.tensor([10 * step, 10 * step + 1]), step)
    assert len(queue) == 5
    embeddings, keys = queue.get(step=4)
    assert keys.tolist() == [20, 21, 30, 31] and not embeddings.requires_grad
    assert embeddings[:, 0].tolist() == [2.0, 2.0, 3.0, 3.0]


def test_gather_without_a_process_group_is_the_local_batch():
    local = torch.randn(3, 4, requires_grad=True)
    assert gather_from_ranks(local) is local


@pytest.fixture(scope="module")
def embedder():
    corpus = ["red cotton shirt", "blue denim jeans", "black leather boots", "green mug"] * 20
    return Embedder.create(load_config().model, corpus, seed=0)


def test_grad_cache_gives_the_full_batch_gradients(embedder):
    colours = [(200, 30, 40), (40, 100, 210), (20, 20, 20), (40, 150, 70)] * 2
    queries = [Input(text=t) for t in ["red shirt", "blue jeans", "black boots", "green mug"] * 2]
    items = [Input(text=f"item {i}", image=Image.new("RGB", (64, 64), c)) for i, c in enumerate(colours)]
    dims = embedder.settings.matryoshka_dims

    def loss(q, c):
        return matryoshka(lambda a, b: info_nce(a, b, 0.05).mean(), q, c, dims)

    def encode(chunk):
        return embedder(embedder.collate(chunk))

    embedder.zero_grad()
    full = loss(encode(queries), encode(items))
    full.backward()
    expected = {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}

    embedder.zero_grad()
    chunked = grad_cache_step(encode, [[queries[i:i + 2] for i in range(0, 8, 2)], [items[i:i + 3] for i in range(0, 8, 3)]], loss)
    assert torch.isclose(chunked, full.detach(), atol=1e-6)
    assert expected
    for name, grad in expected.items():  # equal up to float32 summation order, relative to the tensor's scale
        scale = float(grad.abs().max())
        torch.testing.assert_close(dict(embedder.named_parameters())[name].grad, grad, atol=1e-6 * max(scale, 1.0),
                                   rtol=1e-4, msg=name)


def test_symmetric_info_nce_adds_the_positive_finding_its_query():
    q = unit([[1.0, 0.0], [0.0, 1.0]])
    c = unit([[1.0, 0.1], [0.2, 1.0], [1.0, 1.0]])  # the third candidate takes no part backwards
    t = 0.5
    backward = (c[:2] @ q.T / t).numpy()  # row j: positive j against every query
    expected_backward = [-(backward[j, j] - math.log(np.exp(backward[j]).sum())) for j in range(2)]
    expected = (info_nce(q, c, t).numpy() + expected_backward) / 2
    np.testing.assert_allclose(info_nce(q, c, t, symmetric=True).numpy(), expected, rtol=1e-5)
