#!/usr/bin/env python3
"""CI check: README's first command works in a clean venv, and the demo stops cleanly.

Two modes (standard library only; runs with the system ``python3``):

``smoke_demo.py readme``
    Takes README.md's first command (the first fenced block after "Set up on a fresh Debian 12
    machine"), drops its ``apt-get`` steps (``.ci/install-system.sh`` already installed
    python3-venv), and runs the rest word for word, with two substitutions only: the venv
    ``.venv`` becomes a fresh one in a temporary folder, and the port becomes a free one. So the
    project is installed exactly as README says (same pip arguments, no extras) and the same
    ``balancer serve ...`` line is started.

``smoke_demo.py binary PATH/TO/balancer``
    Serves the demo with an already installed ``balancer`` (the release check uses it on a venv
    that installed the built wheel).

Either way, once the server runs: wait (bounded) for a non-empty list at
``GET /v1/recommendations``, send SIGINT (Ctrl-C), expect exit 0 or 130 within 30 s and no crash
text on stderr ("Traceback", "terminate called", "Aborted", "internal error",
"Fatal Python error", "Segmentation fault"). Any miss exits 1 with the reason and the server's
stderr, which fails CI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRASH_TEXT = ("Traceback", "terminate called", "Aborted", "internal error",
              "Fatal Python error", "Segmentation fault")
RECS_TIMEOUT_S = 180.0  # the server starts and its first cycle solves well within this
STOP_TIMEOUT_S = 30.0


def fail(msg: str, stderr: str = "") -> None:
    print(f"smoke: FAIL: {msg}", file=sys.stderr)
    if stderr:
        print("---- server stderr ----\n" + stderr.rstrip() + "\n-----------------------",
              file=sys.stderr)
    sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readme_first_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"Set up on a fresh Debian 12 machine.*?```\n(.*?)\n```", text, re.S)
    if m is None:
        fail("README.md: no fenced command after 'Set up on a fresh Debian 12 machine'")
    return " ".join(m.group(1).split("\\\n"))


def venv_path(token: str, venv: Path) -> str:
    if token == ".venv":
        return str(venv)
    if token.startswith(".venv/"):
        return str(venv / token[len(".venv/"):])
    return token


def plan_readme(port: int, venv: Path) -> tuple[list[list[str]], list[str]]:
    """README's first command as (setup steps, serve argv), venv and port substituted."""
    cmd = readme_first_command()
    steps = [shlex.split(part) for part in cmd.split("&&")]
    steps = [s for s in steps if s and s[0] != "apt-get"]
    if not steps or "serve" not in steps[-1]:
        fail(f"README's first command does not end with 'balancer serve ...': {cmd!r}")
    serve = steps.pop()
    if "--demo" not in serve:
        fail(f"README's first command does not serve the demo: {cmd!r}")
    pip = [s for s in steps if any(t.endswith("pip") for t in s[:1])]
    if not pip or "install" not in pip[0]:
        fail(f"README's first command installs nothing with pip: {cmd!r}")
    out = [[venv_path(t, venv) for t in s] for s in steps]
    serve = [venv_path(t, venv) for t in serve]
    if "--port" in serve:
        serve[serve.index("--port") + 1] = str(port)
    else:
        serve += ["--port", str(port)]
    return out, serve


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (local URL)
        return json.loads(r.read())


def serve_and_stop(argv: list[str], port: int, cwd: Path = ROOT) -> None:
    print(f"smoke: starting {shlex.join(argv)}", flush=True)
    errf = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errf,
                            stdin=subprocess.DEVNULL)

    def stderr_text() -> str:
        errf.seek(0)
        return errf.read()

    try:
        t0 = time.monotonic()
        recs: object = []
        url = f"http://127.0.0.1:{port}/v1/recommendations"
        while time.monotonic() - t0 < RECS_TIMEOUT_S:
            if proc.poll() is not None:
                fail(f"server exited with {proc.returncode} before serving recommendations",
                     stderr_text())
            try:
                recs = get_json(url)
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                recs = []
            if isinstance(recs, list) and recs:
                break
            time.sleep(0.5)
        else:
            fail(f"no recommendations at {url} within {RECS_TIMEOUT_S:.0f} s", stderr_text())
        assert isinstance(recs, list)
        print(f"smoke: {len(recs)} recommendations after {time.monotonic() - t0:.1f} s, "
              f"e.g. {recs[0].get('vm')} -> {recs[0].get('target') or recs[0].get('to')}",
              flush=True)
        proc.send_signal(signal.SIGINT)
        t1 = time.monotonic()
        try:
            rc = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            fail(f"server still running {STOP_TIMEOUT_S:.0f} s after SIGINT", stderr_text())
        err = stderr_text()
        if rc not in (0, 130):
            fail(f"exit status {rc} after SIGINT (expected 0 or 130)", err)
        crash = [c for c in CRASH_TEXT if c in err]
        if crash:
            fail(f"crash text on stderr: {crash}", err)
        print(f"smoke: OK: exit {rc} {time.monotonic() - t1:.1f} s after SIGINT, "
              "no crash text", flush=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        errf.close()


def main(argv: list[str]) -> None:
    if len(argv) >= 1 and argv[0] == "readme":
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="balancer-smoke-") as tmp:
            venv = Path(tmp) / "venv"
            steps, serve = plan_readme(port, venv)
            for step in steps:
                print(f"smoke: $ {shlex.join(step)}", flush=True)
                rc = subprocess.run(step, cwd=ROOT).returncode
                if rc != 0:
                    fail(f"README step failed with exit {rc}: {shlex.join(step)}")
            serve_and_stop(serve, port)
    elif len(argv) == 2 and argv[0] == "binary":
        exe = shutil.which(argv[1]) or argv[1]
        if not os.access(exe, os.X_OK):
            fail(f"not an executable: {argv[1]}")
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="balancer-smoke-") as tmp:  # not the source tree
            serve_and_stop([exe, "serve", "--demo", "--port", str(port)], port, Path(tmp))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
