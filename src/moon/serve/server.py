"""Starting `moon serve`: who may reach it, then the service, then uvicorn.

The admin routes (reload, real-time items) change what every client sees, so they sit behind a
bearer key, MOON_ADMIN_KEY. On the loopback interface (the default) they may run without one;
on any other address the service refuses to start without a key, unless the admin routes are
left out (`--no-admin`). This is checked before anything is loaded, so the refusal is immediate.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from moon import ui
from moon.config import MoonConfig
from moon.errors import UserError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def admin_key() -> str | None:
    """The bearer key of the admin routes, from MOON_ADMIN_KEY (None: unset or empty)."""
    return os.environ.get("MOON_ADMIN_KEY") or None


def check_exposure(host: str, admin: bool, key: str | None) -> None:
    """Refuses admin routes without a key on a host other machines can reach."""
    if admin and key is None and not is_loopback(host):
        raise UserError(f"--host {host} can be reached from other machines, and the admin routes (reload, new items) "
                        "would be open to them: set MOON_ADMIN_KEY to a secret key, or pass --no-admin")


def serve(config: MoonConfig, run_dir: Path, host: str, port: int, model: str | None = None,
          version: str | None = None, engine: str = "faiss", milvus_uri: str | None = None,
          milvus_alias: str | None = None, watch: bool = False, admin: bool = True) -> None:
    """Loads the serving model and version, then answers HTTP on host:port until stopped."""
    key = admin_key()
    check_exposure(host, admin, key)

    import uvicorn

    from moon.serve.app import create_app
    from moon.serve.engines import open_engine
    from moon.serve.service import Service

    service = Service.start(config.serve, run_dir, model, version, open_engine(engine, run_dir, milvus_uri,
                                                                                milvus_alias))
    state = service.state
    ui.log(f"serving store version {state.version} ({state.count:,} items: {state.base_items:,} in its index, "
           f"{state.delta_items:,} beside it) with model {service.model.label} on http://{host}:{port} "
           f"(admin routes: {'off' if not admin else 'bearer key' if key else 'open, loopback only'})")
    if watch:
        service.watch(config.serve.watch_interval)
    uvicorn.run(create_app(service, key, admin), host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
