"""`moon pretrain`: domain-knowledge injection by next-token prediction (MOON's first stage).

The recipe, top to bottom:

1. Examples from the items table: each item's image with four questions (title,
   attributes, category path, main subject); a seeded 5% of SPUs is held out.
2. The tokenizer: the checkpoint's, or a BPE trained on the training texts (kept in the
   work directory, so a resumed run tokenises exactly as before).
3. The generative Qwen2-VL, causal, loss on answer tokens only; DDP under `torchrun`.
4. `pretrain.steps` optimiser steps over a seeded data order, gradient accumulation in
   chunks, gradient norm clipped to 1; a log line every `log_every` steps and a
   resumable checkpoint every `checkpoint_every` (a restart continues where it stopped
   and ends with the same weights).
5. The answer-token loss on the held-out items before and after training, and the model
   published to `models/pretrain/`, where post-training loads it with `Embedder.load`.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from moon import ui
from moon.config import ModelConfig, MoonConfig
from moon.errors import UserError
from moon.io.tables import read_table
from moon.model.backbone import autocast
from moon.model.generative import IGNORE, AnswerLoss, build_generative, make_collator, save_generative
from moon.model.tokenizer import load_tokenizer, train_tokenizer
from moon.run import RunDir
from moon.train.loop import Checkpoints, Processes, TrainLog, batch_indices, optimiser, publish
from moon.train.pretrain_data import Example, PretrainCollator, build_examples, example_texts, split_items

SECTIONS = ("world", "behaviour", "ingest", "model", "pretrain")  # what the published model depends on
HELDOUT_SHARE = 0.05  # of SPUs, never trained on
HELDOUT_EXAMPLES = 1024  # the held-out loss is measured on at most this many examples
GRAD_CLIP = 1.0
DIGEST_FILE = "config_digest"


def unused(config: MoonConfig) -> str | None:
    """Why `moon demo` skips pretraining under this config: post-training will not start from it."""
    if config.posttrain.from_pretrained:
        return None
    return ("pretrain: skipped, posttrain.from_pretrained is false (stage 1 starts from the untrained backbone; "
            "`moon pretrain` still makes the model)")


def pretrain(config: MoonConfig, run_dir: Path) -> Path:
    """Pretrains the generative model on the run's items; returns the published model directory."""
    run_dir, loop, settings = Path(run_dir), config.pretrain, config.model
    processes = Processes.start()
    digest = config.digest(*SECTIONS)
    work = RunDir(run_dir).work("pretrain")
    claim_work_dir(work, digest, processes)

    # 1. examples; held-out SPUs are never trained on
    items = read_table(run_dir, "items", columns=["spu_id", "title", "category", "attributes", "image"])
    train_rows, heldout_rows = split_items(items, config.seed, HELDOUT_SHARE)
    train = build_examples(items, train_rows, loop.tasks)
    heldout = build_examples(items, heldout_rows, loop.tasks)[:HELDOUT_EXAMPLES]
    if len(train) < loop.batch_size * processes.world_size:
        raise UserError(
            f"{len(train)} training examples cannot fill a global batch of {loop.batch_size} x {processes.world_size} "
            "processes: lower pretrain.batch_size, or add items"
        )

    # 2-3. tokenizer, model, loss, optimiser
    tokenizer = make_tokenizer(settings, example_texts(train), work, processes)
    model = build_generative(settings, tokenizer, config.seed).to(processes.device)
    loss_fn = AnswerLoss(model)
    collate = PretrainCollator(make_collator(model, tokenizer, settings), items.column("image"), loop.max_answer_tokens)
    trained = processes.data_parallel(loss_fn)
    optim, schedule = optimiser(loss_fn.parameters(), loop)
    state = {"model": loss_fn, "optimiser": optim, "schedule": schedule}

    # resume: the same data order follows from the step alone (batch_indices)
    checkpoints = Checkpoints(work, processes, digest)
    start, extra = checkpoints.restore(state)
    if start:
        restore_rng(extra["rng"])
        ui.log(f"pretrain: resuming after step {start} from {checkpoints.path}")
    else:
        extra = {"heldout_before": heldout_loss(loss_fn, collate, heldout, loop.batch_size, settings, processes), "tokens": 0}
    log = TrainLog(work, processes, start)

    # 4. the loop
    global_batch = loop.batch_size * processes.world_size
    window = Window(loop.tasks, processes)
    with ui.progress("pretrain", loop.steps * global_batch, unit="examples") as advance:
        advance(start * global_batch)
        for step in range(start, loop.steps):
            examples = [train[i] for i in batch_indices(len(train), loop.batch_size, step, config.seed, processes)]
            lr = schedule.get_last_lr()[0]  # the rate this step uses
            sums, counts, tokens = train_step(trained, collate, examples, optim, schedule, loop.chunk_size, settings, processes)
            extra["tokens"] += tokens
            window.add(examples, sums, counts)
            done = step + 1
            if done % loop.log_every == 0 or done == loop.steps:
                record = window.flush()
                extra["last_loss"] = record["loss"]
                log.write({"step": done, **record, "lr": lr, "tokens": extra["tokens"]})
            if done % loop.checkpoint_every == 0 or done == loop.steps:
                checkpoints.save(done, state, {**extra, "rng": rng_state()})
            advance(global_batch)

    # 5. measure and publish
    after = heldout_loss(loss_fn, collate, heldout, loop.batch_size, settings, processes)
    before = extra["heldout_before"]
    ui.log(f"pretrain: held-out answer loss {before['loss']:.3f} -> {after['loss']:.3f}")
    final = RunDir(run_dir).model("pretrain")
    if processes.is_main:
        manifest = {
            "stage": "pretrain",
            "config_digest": digest,
            "seed": config.seed,
            "base": settings.checkpoint or "random init",
            "steps": loop.steps,
            "global_batch": global_batch,
            "world_size": processes.world_size,
            "tasks": list(loop.tasks),
            "items": {"train": len(train_rows), "heldout": len(heldout_rows)},
            "examples": {"train": len(train), "heldout_measured": len(heldout)},
            "tokens": extra["tokens"],
            "final_loss": extra.get("last_loss"),
            "heldout_loss": {"before": before, "after": after},
        }
        publish(lambda path: save_generative(model, tokenizer, settings, path), final, manifest)
    processes.stop()
    return final


def claim_work_dir(work: Path, digest: str, processes: Processes) -> None:
    """A run of another config starts over in a clean work directory: besides the checkpoint
    (which `Checkpoints` itself refuses), the kept tokenizer and the log belong to the old run."""
    if processes.is_main:
        marker = work / DIGEST_FILE
        if work.exists() and (not marker.exists() or marker.read_text().strip() != digest):
            ui.log(f"pretrain: {work} holds a run of another config; starting over")
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        marker.write_text(digest + "\n")
    processes.barrier()


def make_tokenizer(settings: ModelConfig, texts: Sequence[str], work: Path, processes: Processes):
    """The checkpoint's tokenizer, or a BPE trained once (by rank 0) and kept in the work directory."""
    if settings.checkpoint:
        return load_tokenizer(settings.checkpoint)
    saved = work / "tokenizer"
    if processes.is_main and not saved.exists():
        tmp = work / ".tokenizer.tmp"
        train_tokenizer(texts, settings.vocab_size).save_pretrained(tmp)
        tmp.rename(saved)
    processes.barrier()
    return load_tokenizer(saved)


def train_step(model, collate, examples: list[Example], optim, schedule, chunk_size: int, settings, processes):
    """One optimiser step over the batch, in chunks whose gradients add up to the whole batch's.

    The loss is the mean over the global batch's answer tokens: each chunk's token-loss
    sum is divided by that global count (times the world size, as DDP averages ranks).
    Returns this rank's per-example loss sums and token counts, and the global input tokens.
    """
    size = chunk_size or len(examples)
    chunks = [collate(examples[i : i + size]) for i in range(0, len(examples), size)]
    counts = torch.tensor(
        [sum(int((c["labels"] != IGNORE).sum()) for c in chunks), sum(int(c["attention_mask"].sum()) for c in chunks)],
        device=processes.device,
    )
    if processes.world_size > 1:
        dist.all_reduce(counts)
    answer_tokens, tokens = counts.tolist()
    optim.zero_grad(set_to_none=True)
    sums, predicted = [], []
    for i, chunk in enumerate(chunks):
        chunk = {key: value.to(processes.device) for key, value in chunk.items()}
        last = i == len(chunks) - 1
        # DDP averages gradients once, on the last chunk
        sync = contextlib.nullcontext() if last or processes.world_size == 1 else model.no_sync()
        with sync:
            with autocast(settings, processes.device):
                loss_sums, chunk_counts = model(chunk)
            (loss_sums.sum() * processes.world_size / answer_tokens).backward()
        sums.append(loss_sums.detach())
        predicted.append(chunk_counts)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], GRAD_CLIP)
    optim.step()
    schedule.step()
    return torch.cat(sums), torch.cat(predicted), tokens


@torch.no_grad()
def heldout_loss(loss_fn, collate, examples: list[Example], batch_size: int, settings, processes) -> dict[str, float]:
    """Mean answer-token loss on held-out examples, overall ("loss") and per task."""
    if not examples:
        return {"loss": float("nan")}
    was_training = loss_fn.training
    loss_fn.eval()
    window = Window(sorted({e.task for e in examples}), Processes(device=processes.device))  # every rank measures all
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {key: value.to(processes.device) for key, value in collate(chunk).items()}
        with autocast(settings, processes.device):
            sums, counts = loss_fn(batch)
        window.add(chunk, sums, counts)
    loss_fn.train(was_training)
    record = window.flush()
    return {key: value for key, value in record.items() if key == "loss" or key.startswith("loss_")}


class Window:
    """Loss per answer token, overall and per task, and examples/s, since the last log line."""

    def __init__(self, tasks: Sequence[str], processes: Processes):
        self.tasks = list(tasks)
        self.processes = processes
        self._reset()

    def _reset(self) -> None:
        self.totals = torch.zeros(2, len(self.tasks), dtype=torch.float64, device=self.processes.device)
        self.examples = 0
        self.started = time.perf_counter()

    def add(self, examples: Sequence[Example], sums: torch.Tensor, counts: torch.Tensor) -> None:
        task = torch.tensor([self.tasks.index(e.task) for e in examples], device=sums.device)
        self.totals[0].index_add_(0, task, sums.double())
        self.totals[1].index_add_(0, task, counts.double())
        self.examples += len(examples)

    def flush(self) -> dict[str, float]:
        totals = self.totals.clone()
        if self.processes.world_size > 1:
            dist.all_reduce(totals)
        losses, tokens = totals.cpu()
        record = {"loss": float(losses.sum() / tokens.sum().clamp(min=1))}
        record.update({f"loss_{t}": float(losses[i] / tokens[i]) for i, t in enumerate(self.tasks) if tokens[i] > 0})
        seconds = time.perf_counter() - self.started
        record["examples_per_s"] = self.examples * self.processes.world_size / max(seconds, 1e-9)
        self._reset()
        return record


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Nothing in the step draws random numbers today (no dropout); a resumed run still
    continues the generators where they stopped, so adding dropout keeps resumes exact."""
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
