"""Many independent tasks on Dask: the runner shared by ``balancer sweep`` (replays) and
``balancer plan --fleet`` (plans).

``connect("local")`` starts a ``LocalCluster`` of worker processes (one per core, one thread
each, never more workers than tasks); ``connect("tcp://HOST:PORT")`` joins a cluster started
with ``dask scheduler`` / ``dask worker``. ``execute`` keeps one future per worker thread
(longest first, when the caller estimates lengths), shows a progress bar on a terminal,
retries a failed task once (resubmitted, any worker) and then records its error without losing
the others, and on Ctrl-C cancels what is unfinished and raises ``Interrupted`` (the commands
exit 130). ``distributed`` is imported lazily: it is the
optional extra ``balancer[dask]``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import Any

from balancer.errors import InputError

_SCHEDULER = re.compile(r"^(local|(tcp|tls|ws|wss)://[^\s:/]+:\d{1,5})$")


def scheduler_arg(text: str) -> str:
    if not _SCHEDULER.match(text):
        raise argparse.ArgumentTypeError(
            f"--scheduler must be 'local' or tcp://HOST:PORT, got {text!r}")
    return text


# environment of the embedded cluster's worker processes (None: unset): one thread per
# numerical library (each worker is one single-thread process per core), glibc's own malloc
# trimming
WORKER_ENV: dict[str, int | None] = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1,
                                     "OPENBLAS_NUM_THREADS": 1, "MALLOC_TRIM_THRESHOLD_": None}


# Dask settings of the embedded cluster: its background work off or slowed down. Each of these
# runs beside the replays on the same cores; together they took about 10 % of a run's wall
# time on 2 cores (a task of 13.1 CPU s: 14.5 s wall with Dask's defaults, 13.2 s with these;
# docs/scale.md). The statistical profiler samples every worker's task thread 100 times a
# second; the system and memory monitors and the event-loop tick wake every 20-500 ms; work
# stealing has nothing to do when each worker holds one task.
QUIET_CONFIG: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "2s",
    "distributed.scheduler.work-stealing": False,
}


class Interrupted(Exception):
    """Ctrl-C while the futures ran; they have been cancelled."""


def connect(scheduler: str, n_runs: int) -> tuple[Any, Any]:
    """(client, cluster-or-None). The embedded cluster: one worker process per core."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("--scheduler: Dask is not installed (pip install 'balancer[dask]')") \
            from None
    if scheduler == "local":
        import dask

        n = max(1, min(os.cpu_count() or 1, n_runs))
        # a worker holds one task at a time (``execute`` also submits no more than that); the
        # default saturation (1.1) would queue two per single-thread worker. The HTTP server
        # on a free port (the default, 8787, may be taken by another cluster on this machine).
        # The worker processes get Dask's single-thread settings for numerical libraries but
        # not its MALLOC_TRIM_THRESHOLD_=65536: glibc then hands freed memory back to the system
        # at once and the next numpy array faults it in again, which doubled the CPU time of a
        # replay (measured, docs/scale.md).
        with dask.config.set({"distributed.scheduler.worker-saturation": 1.0, **QUIET_CONFIG,
                              **{f"distributed.nanny.pre-spawn-environ.{k}": v
                                 for k, v in WORKER_ENV.items()}}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=40)
        return Client(cluster), cluster
    try:
        return Client(scheduler, timeout="10s"), None
    except OSError as exc:
        raise InputError(f"--scheduler {scheduler}: cannot reach the scheduler ({exc})") \
            from None


def execute(client: Any, specs: list[Any], fn: Any, *, retries: int = 1,
            progress: bool | None = None, fn_kwargs: dict[str, Any] | None = None,
            label: str = "runs", cost: Any = None) -> list[dict[str, Any]]:
    """Run ``fn(spec)`` per spec as one future each; retry a failed one ``retries`` times
    (resubmitted, any worker), then record its error. Results in spec order; each has
    ``attempts`` and either the function's dict or ``error``.

    List scheduling: the client keeps one task per worker thread on the cluster and submits the
    next when one ends, the costliest first when ``cost(spec)`` estimates a task's length
    (longest-processing-time first: on few workers a long task then never starts last). Dask
    itself would hand a handful of tasks to the workers as soon as they are submitted, before
    any has run. Ctrl-C cancels what runs, submits nothing more and raises ``Interrupted``."""
    from collections import deque

    from distributed import as_completed
    from tqdm import tqdm

    kw = fn_kwargs or {}
    results: list[dict[str, Any] | None] = [None] * len(specs)
    attempts = [0] * len(specs)
    errors: list[str | None] = [None] * len(specs)
    index: dict[str, int] = {}
    live: set[Any] = set()
    weight = [float(cost(sp)) if cost is not None else 0.0 for sp in specs]
    # stable: equal estimates keep the order given
    pending = deque(sorted(range(len(specs)), key=lambda i: -weight[i]))
    ac = as_completed([], with_results=False)

    def slots() -> int:
        """Worker threads on the cluster now (workers may come and go)."""
        return max(1, sum(client.nthreads().values()))

    def fill() -> None:
        n = slots()
        while pending and len(live) < n:
            i = pending.popleft()
            attempts[i] += 1
            fut = client.submit(fn, specs[i], pure=False, **kw)
            index[fut.key] = i
            live.add(fut)
            ac.add(fut)

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(specs), file=sys.stderr, unit="run", desc=label, disable=not show,
               dynamic_ncols=True)
    try:
        fill()
        for fut in ac:
            i = index[fut.key]
            live.discard(fut)
            if fut.status == "finished":
                results[i] = fut.result()
                bar.update(1)
            else:
                exc = fut.exception()
                errors[i] = f"{type(exc).__name__}: {exc}"
                if attempts[i] <= retries:
                    bar.write(f"run {i + 1} failed ({errors[i]}); retrying", file=sys.stderr)
                    pending.appendleft(i)
                else:
                    bar.update(1)
            fut.release()
            fill()
    except KeyboardInterrupt:
        client.cancel(list(live), force=True)
        raise Interrupted(f"cancelled {len(live) + len(pending)} unfinished runs") from None
    finally:
        bar.close()
    out = []
    for i in range(len(specs)):
        r = dict(results[i]) if results[i] is not None else {"error": errors[i]}
        r["attempts"] = attempts[i]
        out.append(r)
    return out


def close(client: Any, cluster: Any) -> None:
    import contextlib

    with contextlib.suppress(Exception):
        client.close(timeout=10)
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.close(timeout=20)




def run_tasks(scheduler: str, specs: list[Any], fn: Any, *,
              fn_kwargs: dict[str, Any] | None = None, progress: bool | None = None,
              label: str = "runs", cost: Any = None) -> list[dict[str, Any]]:
    """Connect, ``execute``, close. Ctrl-C at any point (also while the embedded cluster
    starts) raises ``Interrupted`` after cancelling whatever was submitted."""
    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    client = cluster = None
    try:
        client, cluster = connect(scheduler, len(specs))
        return execute(client, specs, fn, fn_kwargs=fn_kwargs, progress=progress, label=label,
                       cost=cost)
    except KeyboardInterrupt:
        raise Interrupted("stopped before any task was submitted") from None
    finally:
        signal.signal(signal.SIGINT, old)
        if client is not None:
            close(client, cluster)
