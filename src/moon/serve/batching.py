"""Micro-batching: embedding requests from many clients gathered into one forward pass.

One background thread owns the model. A request hands in its inputs and waits on a future; the
thread takes the oldest requests whole until a batch holds `batch_size` inputs or `batch_wait`
seconds have passed since the first arrived, embeds them in one pass and hands each request
its rows. A single model user also means torch is never entered from two threads at once.

The queue is bounded in inputs, all requests together (waiting or being embedded): a request
that would pass `queue_size` is refused at once (`QueueFull`, answered 429), so a burst cannot
grow memory or latency without bound. If a batch fails, each of its requests is embedded again
on its own, so one input the model cannot take fails only its own request.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from moon.model.inputs import Input

Encode = Callable[[Sequence[Input]], np.ndarray]  # inputs -> (n, dim) float32


class QueueFull(Exception):
    """The batcher holds as many inputs as it may: try again shortly."""


@dataclass
class Job:
    inputs: list[Input]
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Embeds inputs for many threads in shared forward passes (see the module docstring)."""

    def __init__(self, encode: Encode, batch_size: int, batch_wait: float, queue_size: int,
                 on_queue: Callable[[int], None] = lambda size: None,
                 on_batch: Callable[[int], None] = lambda size: None):
        self._encode = encode
        self.batch_size, self.batch_wait, self.queue_size = batch_size, batch_wait, queue_size
        self._on_queue, self._on_batch = on_queue, on_batch
        self._jobs: deque[Job] = deque()
        self._held = 0  # inputs admitted and not answered yet
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moon-embed-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def held(self) -> int:
        return self._held

    def submit(self, inputs: Sequence[Input], bounded: bool = True) -> Future:
        """A future of the inputs' (n, dim) vectors. Raises QueueFull when a `bounded` request would
        pass the queue size (the service's own work, such as a self-test, is not bounded)."""
        job = Job(list(inputs))
        with self._changed:
            if self._closed:
                raise RuntimeError("the embedding worker has stopped")
            if bounded and self._held + len(job.inputs) > self.queue_size:
                raise QueueFull(f"{self._held} inputs are waiting to be embedded and this request brings "
                                f"{len(job.inputs)}: over serve.queue_size={self.queue_size}; retry shortly")
            self._held += len(job.inputs)
            self._jobs.append(job)
            self._changed.notify()
        self._on_queue(self._held)
        return job.future

    def embed(self, inputs: Sequence[Input], timeout: float | None = None, bounded: bool = True) -> np.ndarray:
        return self.submit(inputs, bounded).result(timeout)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------ the worker

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._answer(batch)
            with self._changed:
                self._held -= sum(len(job.inputs) for job in batch)
            self._on_queue(self._held)

    def _next_batch(self) -> list[Job] | None:
        """The oldest jobs, taken whole, up to `batch_size` inputs (a larger job alone), after waiting
        up to `batch_wait` from the first one for others to join; None once closed."""
        with self._changed:
            while not self._jobs:
                if self._closed:
                    return None
                self._changed.wait()
            deadline = time.monotonic() + self.batch_wait
            batch, size = [], 0
            while True:
                while self._jobs and (not batch or size + len(self._jobs[0].inputs) <= self.batch_size):
                    job = self._jobs.popleft()
                    batch.append(job)
                    size += len(job.inputs)
                left = deadline - time.monotonic()
                if size >= self.batch_size or left <= 0 or self._closed or (self._jobs and batch):
                    return batch
                self._changed.wait(left)

    def _answer(self, batch: list[Job]) -> None:
        inputs = [item for job in batch for item in job.inputs]
        try:
            vectors = self._encode(inputs)
        except Exception as error:
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            for job in batch:  # find the job that fails: the others still get their answers
                self._answer([job])
            return
        self._on_batch(len(inputs))
        start = 0
        for job in batch:
            job.future.set_result(vectors[start:start + len(job.inputs)])
            start += len(job.inputs)
