"""systemd notifications from the real daemon (``balancer serve``) on a real AF_UNIX datagram
socket, as systemd would receive them: READY=1 once /healthz answers, STOPPING=1 on SIGTERM,
WATCHDOG=1 pings when WatchdogSec is set; and the API token from a systemd credential."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from balancer import sdnotify


@contextmanager
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(tmp_path / "notify.sock"))
        yield sock
    finally:
        sock.close()


def recv(sock: socket.socket, timeout: float) -> list[str] | None:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode().split("\n")
    except TimeoutError:
        return None


@contextmanager
def serve(env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    base = {k: v for k, v in os.environ.items() if k != "BALANCER_API_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "balancer.cli", "serve", "--demo", "--port",
                             "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**base, "PYTHONUNBUFFERED": "1", **env})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def listening_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError("the daemon never said where it listens")


def test_ready_once_healthz_answers_then_stopping_on_sigterm(tmp_path: Path) -> None:
    with notify_socket(tmp_path) as sock, \
            serve({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}) as proc:
        msgs = []
        while not msgs or "READY=1" not in msgs[-1]:
            got = recv(sock, 60)
            assert got is not None, f"no READY=1 in 60 s (got {msgs})"
            msgs.append(got)
        ready = msgs[-1]
        status = next(f for f in ready if f.startswith("STATUS="))
        url = status.removeprefix("STATUS=serving on ")
        # READY=1 is sent only once the API serves: /healthz answers at once
        r = httpx.get(f"{url}/healthz", timeout=5)
        assert r.status_code == 200
        assert listening_url(proc) == url
        assert all("STOPPING=1" not in m for m in msgs)
        proc.send_signal(signal.SIGTERM)
        stopping = recv(sock, 30)
        assert stopping is not None and "STOPPING=1" in stopping
        assert proc.wait(timeout=30) == 0
        assert recv(sock, 0.2) is None  # nothing after STOPPING=1 (no second one)


def test_watchdog_pings_at_half_the_interval(tmp_path: Path) -> None:
    with notify_socket(tmp_path) as sock, \
            serve({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                   "WATCHDOG_USEC": "2000000"}) as proc:
        seen: list[float] = []
        deadline = time.monotonic() + 90
        while len(seen) < 4 and time.monotonic() < deadline:
            got = recv(sock, 60 if not seen else 5)  # the first once the daemon has started
            assert got is not None, f"no notification ({len(seen)} pings so far)"
            if "WATCHDOG=1" in got:
                seen.append(time.monotonic())
        assert len(seen) == 4
        gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
        # a ping every ~1 s, each well within WatchdogSec (2 s here), the first solve included
        assert 0.5 < min(gaps) and max(gaps) < 2.0, gaps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_no_watchdog_for_another_pid_or_without_the_socket(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    with notify_socket(tmp_path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        assert sdnotify.notify("READY=1", "STATUS=x") is True
        assert recv(sock, 1) == ["READY=1", "STATUS=x"]
    # the socket is gone: a failed notification is not an error of the service
    assert sdnotify.notify("READY=1") is False


def test_abstract_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"balancer-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1") is True
        assert recv(sock, 1) == ["READY=1"]
    finally:
        sock.close()


def test_api_token_from_a_systemd_credential_through_the_real_server(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "api_token").write_text("cred-token\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    with serve(env) as proc:
        url = listening_url(proc)
        r = httpx.post(f"{url}/v1/cycle", timeout=60)
        assert r.status_code == 401
        r = httpx.post(f"{url}/v1/cycle", headers={"Authorization": "Bearer wrong"}, timeout=60)
        assert r.status_code == 401
        r = httpx.post(f"{url}/v1/cycle", headers={"Authorization": "Bearer cred-token"},
                       timeout=60)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
