"""packaging/systemd: the unit passes ``systemd-analyze verify`` (where the tool exists), has the
service properties the operations guide promises, and its sample config passes the daemon's own
validation."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from balancer.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "systemd" / "balancer.service"
SAMPLE = ROOT / "packaging" / "systemd" / "balancer.toml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's balancer (verify checks it exists)."""
    exe = Path(sys.executable).parent / "balancer"
    assert exe.exists(), exe
    text = UNIT.read_text().replace("/opt/balancer/venv/bin/balancer", str(exe))
    out = tmp_path / "balancer.service"
    out.write_text(text)
    return out


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes_without_a_warning(tmp_path: Path) -> None:
    unit = unit_for_this_machine(tmp_path)
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "" and r.stdout.strip() == ""


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # the check above can fail: a typo in a key or value is reported
    unit = unit_for_this_machine(tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy")
                    .replace("Restart=on-failure", "Restat=on-failure"))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert "notifyy" in r.stderr and "Restat" in r.stderr


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_is_notify_restarting_hardened_with_a_credential() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert s["DynamicUser"] == ["yes"] and s["User"] == ["balancer"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["PrivateTmp"] == ["yes"]
    assert s["StateDirectory"] == ["balancer"]  # the one writable folder
    assert s["LoadCredential"] == ["api_token:/etc/balancer/api_token"]
    assert "WatchdogSec" in s
    assert s["ExecStart"] == ["/opt/balancer/venv/bin/balancer serve --config "
                              "/etc/balancer/balancer.toml"]
    text = UNIT.read_text()
    assert "api_token =" not in text and "BALANCER_API_TOKEN" not in text
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    assert set(parser.sections()) == {"Unit", "Service", "Install"}


def test_sample_config_is_valid_and_keeps_state_in_the_state_directory(tmp_path: Path) -> None:
    import tomllib

    data = tomllib.loads(SAMPLE.read_text())
    # the inventory named there exists on a real install; give it one to check the rest
    inv = tmp_path / "inventory.json"
    inv.write_text((ROOT / "balancer" / "data" / "demo-cluster.json").read_text())
    data["cluster"]["inventory"] = str(inv)
    cfg = parse_config(data, where=str(tmp_path / "balancer.toml"))
    assert cfg.store.path == "/var/lib/balancer/balancer.db"
    assert cfg.server.api_token is None  # the token is the credential, not in the file
