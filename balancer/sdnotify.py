"""systemd's service notification protocol (``Type=notify``), the few lines it needs.

systemd passes ``$NOTIFY_SOCKET``, an ``AF_UNIX`` datagram socket (a path, or an abstract name
written ``@name``); the service sends newline-separated ``KEY=VALUE`` datagrams to it:
``READY=1`` once it serves, ``STOPPING=1`` when it begins to shut down, ``WATCHDOG=1`` at least
every ``$WATCHDOG_USEC`` microseconds when the unit sets ``WatchdogSec=`` (systemd kills and,
with ``Restart=on-failure``, restarts a service that stops pinging), ``STATUS=...`` free text
shown by ``systemctl status``. See sd_notify(3).

Why not a library: the protocol is one ``sendto`` on a datagram socket; ``systemd-python``
needs libsystemd headers and a compiler, and the pure-Python ``sdnotify`` package has had no
release since 2017. Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.
Sending never raises: a notification that cannot be delivered is logged once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("balancer.sdnotify")
_warned = False


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):  # abstract namespace
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    return None  # vsock: and other forms are not used for a host service


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) in one datagram; True if sent."""
    global _warned
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), addr)
    except OSError as exc:
        if not _warned:
            log.warning("systemd notification to %s failed: %s", os.environ["NOTIFY_SOCKET"],
                        exc)
            _warned = True
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds systemd allows between ``WATCHDOG=1`` pings, or None (no ``WatchdogSec=``, or
    the variables are meant for another process: ``$WATCHDOG_PID`` is not ours)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pings ``WATCHDOG=1`` every half interval while ``alive()`` says the service works.

    ``alive`` is the daemon's health (its control loop thread runs): when it stops being true
    the pings stop, systemd's watchdog fires, and the unit restarts the service. ``stop()``
    ends the thread (joined). Without a watchdog interval nothing is started.
    """

    def __init__(self, alive: Callable[[], bool]) -> None:
        self.interval = watchdog_interval()
        self._alive = alive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.interval is not None and _address() is not None:
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self.interval is not None
        period = self.interval / 2
        while True:
            if self._alive():
                notify("WATCHDOG=1")
            if self._stop.wait(period):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
