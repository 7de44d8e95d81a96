"""Pretraining: examples and answer-only labels, the generative model, resume, and the published model."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL, free_port
from moon.config import load_config
from moon.io.tables import read_table
from moon.model.embedder import Embedder
from moon.model.generative import IGNORE, AnswerLoss, build_generative, make_collator, save_generative
from moon.model.tokenizer import EOS, IMAGE_PAD, train_tokenizer
from moon.run import RunDir
from moon.train import pretrain as recipe
from moon.train.loop import optimiser, read_log
from moon.train.pretrain_data import (
    PretrainCollator,
    answers,
    build_examples,
    example_texts,
    split_items,
)

FAST = [
    *TINY_MODEL,
    "pretrain.batch_size=8",
    "pretrain.warmup_steps=1",
    "pretrain.lr=0.003",
    "pretrain.log_every=1",
]


def fast_config(*overrides):
    return load_config(None, [*FAST, *overrides])


@pytest.fixture(scope="module")
def items(tiny_world):
    return read_table(tiny_world, "items")


@pytest.fixture(scope="module")
def parts(items):
    """A tokenizer trained on the examples' texts, a fresh generative model and its collator."""
    settings = fast_config().model
    examples = build_examples(items, range(items.num_rows), ["title", "attributes", "category", "subject"])
    tokenizer = train_tokenizer(example_texts(examples), settings.vocab_size)
    model = build_generative(settings, tokenizer, seed=0)
    collate = PretrainCollator(make_collator(model, tokenizer, settings), items.column("image"), max_answer_tokens=32)
    return settings, tokenizer, model, collate, examples


@pytest.fixture
def run_dir(tiny_world, tmp_path):
    """A run directory of its own with the tiny world's items (the shared world stays untouched)."""
    shutil.copytree(tiny_world / "items", tmp_path / "items")
    return tmp_path


def test_each_task_answers_from_the_item():
    said = answers("Suixda maroon boots", ["Shoes", "Boots", "Ankle Boots"], [("brand", "Suixda"), ("colour", "burgundy"), ("material", "rubber"), ("size", None)])
    assert said == {
        "title": "Suixda maroon boots",
        "attributes": "brand: Suixda; colour: burgundy; material: rubber",
        "category": "Shoes > Boots > Ankle Boots",
        "subject": "burgundy rubber ankle boots",
    }
    assert set(answers("a mug", [], None)) == {"title"}  # nothing to say is no example


def test_held_out_spus_are_whole_seeded_and_disjoint(items):
    train, heldout = split_items(items, seed=0, heldout_share=0.05)
    spus = items.column("spu_id").to_numpy(zero_copy_only=False)
    assert len(train) + len(heldout) == items.num_rows and heldout.size > 0
    assert not set(spus[train]) & set(spus[heldout])
    again, other = split_items(items, seed=0, heldout_share=0.05)[1], split_items(items, seed=1, heldout_share=0.05)[1]
    assert again.tolist() == heldout.tolist() and other.tolist() != heldout.tolist()


def test_labels_are_the_answer_tokens_and_eos_only(parts):
    _, tokenizer, _, collate, examples = parts
    short, long = examples[2], examples[0]  # a category path, and a title
    collate.max_answer_tokens = 4
    try:
        batch = collate([short, long])
    finally:
        collate.max_answer_tokens = 32
    eos = tokenizer.convert_tokens_to_ids(EOS)
    for row, example in enumerate([short, long]):
        answer = tokenizer(" " + example.answer, add_special_tokens=False)["input_ids"]
        length = int(batch["attention_mask"][row].sum())
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        target = answer + [eos] if len(answer) <= 4 else answer[:4]  # a cut answer gets no eos
        assert labels[length - len(target) : length].tolist() == target == ids[length - len(target) : length].tolist()
        assert (labels[: length - len(target)] == IGNORE).all() and (labels[length:] == IGNORE).all()
        prompt = tokenizer.decode(ids[: length - len(target)])
        assert prompt.endswith(example.prompt) and int((ids == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).sum()) == 4
    assert len(tokenizer(" " + long.answer, add_special_tokens=False)["input_ids"]) > 4  # the title was cut
    assert batch["pixel_values"].shape[0] == 2 * 16 and batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).int())


def test_padding_changes_no_example_loss(parts):
    _, _, model, collate, examples = parts
    loss_fn = AnswerLoss(model)
    short, long = examples[3], examples[4]  # a subject, and a longer title
    with torch.no_grad():
        alone, _ = loss_fn(collate([short]))
        padded, _ = loss_fn(collate([short, long]))
    assert collate([short, long])["attention_mask"][0].sum() < collate([short, long])["attention_mask"][1].sum()
    torch.testing.assert_close(alone[0], padded[0], atol=1e-4, rtol=1e-5)


def test_the_model_is_causal_and_the_loss_falls_on_a_fixed_batch(parts):
    settings, _, model, collate, examples = parts
    assert model.model.language_model.config.is_causal
    loss_fn = AnswerLoss(build_generative(settings, collate.tokenizer, seed=0))
    batch = collate(examples[:16])
    optim, _ = optimiser(loss_fn.parameters(), fast_config("pretrain.warmup_steps=0").pretrain)
    losses = []
    for _ in range(8):
        sums, counts = loss_fn(batch)
        loss = sums.sum() / counts.sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert int(counts.sum()) == int((batch["labels"] != IGNORE).sum())
    assert losses[-1] < losses[0] - 0.5 and all(b < a for a, b in zip(losses, losses[1:]))


def test_chunked_accumulation_gives_the_whole_batch_gradient(parts):
    settings, _, _, collate, examples = parts
    loop = fast_config().pretrain
    grads = []
    for chunk_size in (0, 3):
        loss_fn = AnswerLoss(build_generative(settings, collate.tokenizer, seed=0))
        optim, schedule = optimiser(loss_fn.parameters(), loop)
        optim.step = lambda: None  # keep the gradients, not the update
        schedule.step = lambda: None
        recipe.train_step(loss_fn, collate, examples[:8], optim, schedule, chunk_size, settings, recipe.Processes())
        grads.append(torch.cat([p.grad.flatten() for p in loss_fn.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_a_killed_run_resumes_to_the_same_weights_and_the_published_model_loads(run_dir, tmp_path, monkeypatch):
    config = fast_config("pretrain.steps=4", "pretrain.checkpoint_every=2")
    straight_dir = tmp_path / "straight"
    shutil.copytree(run_dir / "items", straight_dir / "items")
    straight = recipe.pretrain(config, straight_dir)

    real_step, calls = recipe.train_step, []

    def killed_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after the checkpoint of step 2, in the middle of step 3
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recipe, "train_step", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        recipe.pretrain(config, run_dir)
    assert not RunDir(run_dir).model("pretrain").exists()
    calls.clear()
    monkeypatch.setattr(recipe, "train_step", lambda *args, **kwargs: calls.append(1) or real_step(*args, **kwargs))
    resumed = recipe.pretrain(config, run_dir)
    assert len(calls) == 2  # steps 3 and 4 only: it resumed rather than started over

    weights, expected = load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert weights.keys() == expected.keys()
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key
    log = read_log(RunDir(run_dir).work("pretrain"))
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["loss"] for r in log] == [r["loss"] for r in read_log(RunDir(straight_dir).work("pretrain"))]

    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["config_digest"] == config.digest("world", "behaviour", "ingest", "model", "pretrain")
    assert manifest["steps"] == 4 and manifest["final_loss"] == log[-1]["loss"]
    before, after = manifest["heldout_loss"]["before"], manifest["heldout_loss"]["after"]
    assert after["loss"] < before["loss"] and set(before) == {"loss", *(f"loss_{t}" for t in config.pretrain.tasks)}

    # the embedder reads the trained backbone: every weight equal, none newly initialised
    trained = torch.load(RunDir(run_dir).work("pretrain") / "checkpoint" / "state.pt", weights_only=False)["state"]["model"]
    embedder = Embedder.load(resumed)
    backbone = embedder.backbone.state_dict()
    assert {f"model.model.{key}" for key in backbone} | {"model.lm_head.weight"} == set(trained)
    for key, value in backbone.items():
        assert torch.equal(value, trained[f"model.model.{key}"]), key
    assert not embedder.backbone.language_model.config.is_causal  # embedding stays bidirectional
    assert embedder.encode([first_item(run_dir)]).shape == (1, 32)
    # and the whole generative model, LM head included, continues from it
    again = build_generative(config.model.model_copy(update={"checkpoint": str(resumed)}), embedder.tokenizer)
    for key, value in again.state_dict().items():
        assert torch.equal(value, trained[f"model.{key}"]), key


def first_item(run_dir):
    from moon.model.inputs import Input

    row = read_table(run_dir, "items", columns=["title", "image"]).slice(0, 1).to_pylist()[0]
    return Input(text=row["title"], image=row["image"])


def test_a_checkpoint_of_another_config_is_not_resumed(run_dir):
    recipe.pretrain(fast_config("pretrain.steps=2", "pretrain.checkpoint_every=1"), run_dir)
    changed = fast_config("pretrain.steps=1", "pretrain.lr=0.001")
    recipe.pretrain(changed, run_dir)
    assert [r["step"] for r in read_log(RunDir(run_dir).work("pretrain"))] == [1]
    assert json.loads((RunDir(run_dir).model("pretrain") / "manifest.json").read_text())["steps"] == 1


def test_lora_bf16_and_checkpointing_train_only_adapters_and_save_merged(parts, tmp_path):
    settings, tokenizer, _, collate, examples = parts
    settings = settings.model_copy(update={"lora_rank": 4, "dtype": "bfloat16", "gradient_checkpointing": True})
    model = build_generative(settings, tokenizer, seed=0)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and "language_model" in name for name in trainable)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    loss_fn = AnswerLoss(model)
    loop = fast_config("pretrain.warmup_steps=0").pretrain
    optim, schedule = optimiser(loss_fn.parameters(), loop)
    layer = model.get_base_model().model.language_model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().float().clone()
    for _ in range(2):
        recipe.train_step(loss_fn, collate, examples[:4], optim, schedule, 2, settings, recipe.Processes())
    expected = before + layer.get_delta_weight("default").detach().float()

    path = save_generative(model, tokenizer, settings, tmp_path / "lora")
    assert not any("lora" in key for key in load_file(path / "model.safetensors"))
    merged = Embedder.load(path).backbone.language_model.layers[0].self_attn.q_proj.weight.float()
    assert not torch.equal(merged, before)  # the adapters' update is in the weights
    torch.testing.assert_close(merged, expected, atol=1e-2, rtol=0)  # bf16 rounding of the merge


def test_examples_use_every_configured_task_and_only_those(items):
    examples = build_examples(items, [0, 1, 2], ["category", "subject"])
    assert [e.task for e in examples] == ["category", "subject"] * 3
    assert [e.row for e in examples] == [0, 0, 1, 1, 2, 2]
    assert build_examples(items, [5], ["title"])[0].answer == items.column("title")[5].as_py()
    assert isinstance(items.column("image"), pa.ChunkedArray)



DDP_WORKER = """
import os, sys
from moon import ui
from moon.config import load_config
from moon.train.pretrain import pretrain
ui.set_quiet(True)
pretrain(load_config(None, sys.argv[2:]), sys.argv[1])
os._exit(0)  # skip interpreter teardown, where gloo's threads can abort a finished process
"""


def test_two_torchrun_ranks_train_as_one_process_on_the_whole_batch(run_dir, tmp_path):
    """DDP (gloo), each rank half the batch in accumulated chunks, gives one process's weights."""
    steps = ["pretrain.steps=2", "pretrain.checkpoint_every=2"]
    single_dir = tmp_path / "single"
    shutil.copytree(run_dir / "items", single_dir / "items")
    single = recipe.pretrain(fast_config(*steps), single_dir)

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), str(run_dir), *FAST, *steps, "pretrain.batch_size=4", "pretrain.chunk_size=3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]

    weights, expected = load_file(RunDir(run_dir).model("pretrain") / "model.safetensors"), load_file(single / "model.safetensors")
    # Adam moves each weight by up to lr a step; where a gradient is as small as Adam's epsilon, the
    # order of summation (two ranks, chunks) moves that step a little: within 1% of one step.
    step = fast_config(*steps).pretrain.lr
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], atol=0.01 * step, rtol=1e-4)
    manifest = json.loads((RunDir(run_dir).model("pretrain") / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 8
    assert [r["tokens"] for r in read_log(RunDir(run_dir).work("pretrain"))] == [r["tokens"] for r in read_log(RunDir(single_dir).work("pretrain"))]
