"""Switch a running `moon serve` between store versions while clients search, and count failures.

Client threads search by item id (`POST /v1/search`) for `--seconds`, each on its own keep-alive
connection, while the main thread reloads the versions given with `--versions` in turn
(`POST /v1/admin/reload`, bearer key from MOON_ADMIN_KEY). It prints, as one JSON object, the
requests sent, the failures (any non-200 answer or a transport error), the answers per version,
and each reload's time. Traffic goes to the service's address only, bounded in time.

    MOON_ADMIN_KEY=secret moon serve --run-dir runs/demo &
    MOON_ADMIN_KEY=secret python examples/serve_load_test.py --versions v1-stage2 v3-stage2
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import Counter

import httpx


def search_loop(base: str, items: list[str], stop: threading.Event, seen: Counter, failures: list, lock):
    with httpx.Client(base_url=base, timeout=30) as client:
        turn = 0
        while not stop.is_set():
            item = items[turn % len(items)]
            turn += 1
            try:
                answer = client.post("/v1/search", json={"item_id": item, "k": 10})
            except httpx.HTTPError as exc:
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                if answer.status_code == 200:
                    seen[answer.json()["version"]] += 1
                else:
                    failures.append(f"{answer.status_code}: {answer.text[:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--versions", nargs="+", required=True, help="store versions to switch between, in turn")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--switches", type=int, default=4)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {os.environ.get('MOON_ADMIN_KEY', '')}"}
    with httpx.Client(base_url=args.url, timeout=600) as admin:
        version = admin.get("/readyz").json()["version"]
        items = [hit["item_id"] for hit in admin.post("/v1/search", json={"text": "dress", "k": 50}).json()["hits"]]
        stop, lock, seen, failures = threading.Event(), threading.Lock(), Counter(), []
        clients = [threading.Thread(target=search_loop, args=(args.url, items, stop, seen, failures, lock))
                   for _ in range(args.threads)]
        for thread in clients:
            thread.start()
        reloads = []
        for switch in range(args.switches):
            time.sleep(args.seconds / (args.switches + 1))
            target = args.versions[switch % len(args.versions)]
            started = time.perf_counter()
            answer = admin.post("/v1/admin/reload", json={"version": target}, headers=headers)
            reloads.append({"to": target, "status": answer.status_code,
                            "seconds": round(time.perf_counter() - started, 2)})
        time.sleep(args.seconds / (args.switches + 1))
        stop.set()
        for thread in clients:
            thread.join()
    print(json.dumps({"started_on": version, "requests": sum(seen.values()) + len(failures),
                      "failures": len(failures), "first_failures": failures[:3], "answers_by_version": seen,
                      "reloads": reloads}))


if __name__ == "__main__":
    main()
