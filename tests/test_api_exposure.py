"""Safe exposure of `balancer serve`: a non-loopback address needs a token (or an explicit
--insecure-no-auth), and TLS from [server] tls_cert / tls_key through uvicorn's own TLS."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from balancer.serve_cli import is_loopback


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "BALANCER_API_TOKEN"}


def _serve(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "balancer.cli", "serve", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=_env())


def _listening(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"listening on (https?://\S+)", line)
        if m:
            return m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("balancer serve did not start")


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("db.example.org")


def test_a_non_loopback_address_without_a_token_is_refused() -> None:
    r = subprocess.run([sys.executable, "-m", "balancer.cli", "serve", "--demo", "--host",
                        "0.0.0.0", "--port", "0"], capture_output=True, text=True, env=_env(),
                       timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to listen on 0.0.0.0 without an API token" in lines[0]
    assert "Traceback" not in r.stderr


def test_insecure_no_auth_exposes_the_reads_only(tmp_path: Path) -> None:
    proc = _serve(["--demo", "--host", "0.0.0.0", "--port", "0", "--insecure-no-auth"])
    try:
        url = _listening(proc).replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        r = httpx.post(f"{url}/v1/whatif", json={"snapshot": {}}, timeout=10)
        assert r.status_code == 403  # no token configured: computations stay refused
    finally:
        assert _stop(proc) in (0, 130)


def test_tls_from_the_config(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    cfg = tmp_path / "tls.toml"
    cfg.write_text(f"""
[server]
api_token = "tls-token"
tls_cert = "{cert}"
tls_key = "{key}"
[store]
path = "{tmp_path / 'state.db'}"
""")
    proc = _serve(["--config", str(cfg), "--port", "0"])
    try:
        url = _listening(proc)
        assert url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        r = httpx.get(f"{url}/healthz", verify=ctx, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = httpx.post(f"{url}/v1/whatif", json={"snapshot": {}}, verify=ctx, timeout=10)
        assert r.status_code == 401  # TLS or not, the token is checked first
        # Plain HTTP on the TLS port gets nowhere.
        plain = url.replace("https://", "http://")
        try:
            status = httpx.get(f"{plain}/healthz", timeout=5).status_code
        except httpx.HTTPError:
            status = None
        assert status != 200
    finally:
        assert _stop(proc) in (0, 130)


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    cfg = tmp_path / "half.toml"
    cfg.write_text(f'[server]\ntls_cert = "{cert}"\n')
    r = subprocess.run([sys.executable, "-m", "balancer.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 2 and "[server] tls_cert: give both tls_cert and tls_key" in r.stderr
