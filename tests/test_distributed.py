"""Two real `torchrun` CPU processes (gloo) give the loss and gradients of one process on the whole batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import free_port
from moon.train.losses import info_nce

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402


def test_two_ranks_with_spatial_negatives_equal_one_process_on_the_concatenated_batch(tmp_path):
    out = tmp_path / "rank0.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(Path(worker.__file__)), str(out),
    ]
    # Its own session, so that a hang ends with every process of it killed and what they said.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 300 s: {stderr[-2000:]}")
    assert process.returncode == 0, stderr[-2000:]
    distributed = json.loads(out.read_text())

    model = worker.encoder()
    queries, items = worker.data()
    loss = info_nce(F.normalize(model(queries), dim=-1), F.normalize(model(items), dim=-1), 0.1).mean()
    loss.backward()
    assert distributed["negatives"] == worker.BATCH - 1  # each rank saw the other rank's items
    assert abs(distributed["loss"] - loss.item()) < 1e-5
    for name, param in model.named_parameters():
        torch.testing.assert_close(torch.tensor(distributed["grads"][name]), param.grad, atol=1e-5, rtol=1e-4)
