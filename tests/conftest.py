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


# A small run for the representation store and its index: the first STORE_ITEMS rows of the
# tiny world's catalogue (the rest arrive "later") and an untrained tiny model as stage 2.
STORE_ITEMS = 200
STORE_OVERRIDES = [*TINY_WORLD, *TINY_MODEL, "name=tiny", "store.partitions=8", "store.batch_size=16"]


def store_config(*overrides):
    return load_config(None, [*STORE_OVERRIDES, *overrides])


def write_items(run_dir, items):
    """Replaces the run's items table, as a catalogue refresh would."""
    from moon.io import schema
    from moon.io.tables import TableWriter

    with TableWriter(run_dir, "items", schema.ITEMS) as writer:
        writer.write(items)
        writer.commit()


def publish_untrained(run_dir, stage: str, seed: int):
    """An untrained tiny embedder published where a trained stage would be."""
    from moon.io.tables import read_table
    from moon.model.embedder import Embedder
    from moon.model.views import ItemViews
    from moon.run import RunDir
    from moon.train.loop import publish

    embedder = Embedder.create(store_config().model, ItemViews(read_table(run_dir, "items")).texts(), seed=seed)
    return publish(embedder.save, RunDir(run_dir).model(stage), {"stage": stage})


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
    from moon.sources.simulate.write import simulate

    run_dir = tmp_path_factory.mktemp("tiny-world")
    simulate(load_config(None, [*TINY_WORLD, "name=tiny"]), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def store_world(tiny_world, tmp_path_factory):
    """A run directory with STORE_ITEMS catalogue items and an untrained tiny model as stage 2;
    tests copy it (`shutil.copytree`) before changing anything."""
    from moon.io.tables import read_table

    run_dir = tmp_path_factory.mktemp("store-world")
    write_items(run_dir, read_table(tiny_world, "items").slice(0, STORE_ITEMS))
    publish_untrained(run_dir, "stage2", seed=0)
    return run_dir


@pytest.fixture(scope="session")
def log_world(tiny_world, tmp_path_factory):
    """A run directory with the tiny world's catalogue, behaviour log and item truth and an untrained
    tiny model as stage 2; tests copy it (`shutil.copytree`) before changing anything."""
    import shutil

    from moon.run import RunDir

    run_dir = tmp_path_factory.mktemp("log-world")
    for table in ("items", "events", "item_truth", "query_truth"):
        shutil.copytree(RunDir(tiny_world).table(table), RunDir(run_dir).table(table))
    publish_untrained(run_dir, "stage2", seed=0)
    return run_dir
