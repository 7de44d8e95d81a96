import socket
from pathlib import Path

import pytest

from moon import ui
from moon.config import load_config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_WORLD = [
    "world.items=240",
    "world.leaf_categories=12",
    "world.brands=15",
    "world.shops=6",
    "world.image_size=48",
    "world.chunk_items=100",
    "behaviour.users=40",
    "behaviour.days=6",
    "behaviour.sessions_per_user_day=1.5",
    "behaviour.photo_size=48",
]


# A model small enough that a training step takes milliseconds.
TINY_MODEL = [
    "model.hidden_size=32",
    "model.heads=2",
    "model.kv_heads=1",
    "model.vision_dim=32",
    "model.vision_heads=2",
    "model.image_size=32",
    "model.vocab_size=512",
    "model.matryoshka_dims=[16]",
]


def free_port() -> int:
    """A loopback port for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def quiet():
    """No progress bars in test output; the CLI tests check --quiet on real processes."""
    ui.set_quiet(True)
    yield
    ui.set_quiet(False)


def shared_data(name: str) -> Path:
    """A real catalogue from ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it lives beside the repository in ../shared/data)")
    return path


@pytest.fixture
def tiny_config():
    return load_config(None, [*TINY_WORLD, "name=tiny"])


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny simulated world, made once per test session; tests must not modify it."""
    from moon.data.world.simulate import simulate

    run_dir = tmp_path_factory.mktemp("tiny-world")
    simulate(load_config(None, [*TINY_WORLD, "name=tiny"]), run_dir)
    return run_dir
