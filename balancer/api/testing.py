"""Run the API on a real uvicorn server in a thread (tests and benchmarks).

``with serve_in_thread(app) as url: ...`` binds 127.0.0.1 on a free port, waits until the
server accepts requests, and stops it (and joins the thread) on exit, even on failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", timeout_s: float = 20.0
                    ) -> Iterator[str]:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=0, log_level="warning", access_log=False,
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        sock = server.servers[0].sockets[0]
        port = sock.getsockname()[1]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)


def samples_for(doc: dict[str, Any], now: float, *, times: tuple[float, ...] = (60.0, 30.0, 0.0),
                skip_vms: tuple[str, ...] = (), skip_hosts: tuple[str, ...] = ()
                ) -> list[dict[str, Any]]:
    """Push-API samples reproducing a snapshot document's demand (hosts get their VMs' sum)."""
    out: list[dict[str, Any]] = []
    host_cpu = {h["name"]: 0.0 for h in doc["hosts"]}
    host_mem = {h["name"]: 0.0 for h in doc["hosts"]}
    for v in doc["vms"]:
        host_cpu[v["host"]] += v["cpu_demand"]
        host_mem[v["host"]] += v["mem_demand_mb"]
    for back in times:
        ts = now - back
        for v in doc["vms"]:
            if v["name"] not in skip_vms:
                out.append({"ts": ts, "vm": v["name"], "cpu_cores": v["cpu_demand"],
                            "mem_mb": v["mem_demand_mb"]})
        for h in doc["hosts"]:
            if h["name"] not in skip_hosts:
                out.append({"ts": ts, "host": h["name"], "cpu_cores": host_cpu[h["name"]],
                            "mem_mb": host_mem[h["name"]]})
    return out
