"""``balancer config example`` and ``balancer config check``: the documented full config is
generated from the daemon's own dataclasses, parses back to the defaults, and check uses the
daemon's validation (exit 2, one line naming the field)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from balancer.config import (
    KEY_DOCS,
    KEY_EXAMPLES,
    ServiceConfig,
    config_sections,
    example_config,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent


def balancer(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balancer.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=kw.get("cwd"))


def test_example_command_prints_a_config_that_parses_back_to_the_defaults(tmp_path: Path) -> None:
    r = balancer("config", "example")
    assert r.returncode == 0, r.stderr
    assert r.stdout == example_config()
    assert parse_config(tomllib.loads(r.stdout)) == ServiceConfig()
    # written to a file, the daemon's loader reads it (paths resolve beside the file)
    f = tmp_path / "balancer.toml"
    f.write_text(r.stdout)
    cfg = load_config(f)
    assert cfg.store.path == str(tmp_path / "balancer.db")
    assert dataclasses.replace(cfg, source_path=None,
                               store=ServiceConfig().store) == ServiceConfig()


def test_every_key_of_the_daemon_config_is_in_the_example_with_a_comment() -> None:
    text = example_config()
    for section, cls in config_sections():
        assert f"[{section}]" in text
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            assert KEY_DOCS.get(key), f"no comment for {key}: add it to balancer.config.KEY_DOCS"
            shown = (re.search(rf"^(# )?{f.name} = ", text, re.M)
                     or f"[{key}]" in text)
            assert shown, key
            assert "(undocumented)" not in text


def test_the_commented_out_examples_are_valid_too(tmp_path: Path) -> None:
    (tmp_path / "inventory.json").write_text(
        (ROOT / "balancer" / "data" / "demo-cluster.json").read_text())
    (tmp_path / "executor.toml").write_text("[limits]\nmax_concurrent = 2\n")
    text = example_config().replace('"/etc/balancer/inventory.json"', '"inventory.json"')
    text = text.replace('"/etc/balancer/executor.toml"', '"executor.toml"')
    for key in KEY_EXAMPLES:
        if key.startswith("server.tls_"):  # needs a real certificate (tests/test_api_*)
            continue
        name = key.split(".")[1]
        text = re.sub(rf"^# ({name} = )", r"\1", text, flags=re.M)
    text = text.replace('# vm-042 = "disabled"', 'vm-042 = "disabled"')
    f = tmp_path / "full.toml"
    f.write_text(text)
    r = balancer("config", "check", str(f))
    assert r.returncode == 0, r.stderr
    assert "inventory 16 hosts, 200 VMs" in r.stdout
    cfg = load_config(f)
    assert cfg.cluster.max_migrations == 10 and cfg.server.api_token == "change-me"
    assert cfg.cluster.vm_automation == {"vm-042": "disabled"}
    # the inline executor settings shown commented out are valid as well
    inline = example_config().replace("# [executor.settings]", "[executor.settings]")
    inline = inline.replace("# limits = {", "limits = {")
    cfg = parse_config(tomllib.loads(inline))
    assert cfg.executor.settings == {"limits": {"max_concurrent": 2}}


@pytest.mark.parametrize("name", ["demo.toml", "prometheus-recommend.toml",
                                  "libvirt-full-auto.toml"])
def test_check_accepts_the_bundled_service_configs(name: str) -> None:
    r = balancer("config", "check", str(ROOT / "configs" / name))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{ROOT / 'configs' / name}: ok (")


@pytest.mark.parametrize(("text", "field"), [
    ("[loop]\ninterval_s = -5\n", "[loop] interval_s: must be a number > 0, got -5"),
    ("[server]\nport = 70000\n", "[server] port: must be <= 65535"),
    ("[cluster]\nautomation = 'auto'\n", "[cluster] automation: must be one of"),
    ("[ingest]\nsorce = 'push'\n", "[ingest] sorce: unknown key"),
    ("[store]\npath = 3\n", "[store] path: must be a non-empty string"),
    ("[executor]\nconfig = 'missing.toml'\n", "[executor] config: no such file"),
    ("[loop\n", "not valid TOML"),
])
def test_check_exits_2_with_one_line_naming_the_field(tmp_path: Path, text: str,
                                                       field: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    r = balancer("config", "check", str(f))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and str(f) in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_check_names_a_bad_key_in_the_executor_file_it_points_to(tmp_path: Path) -> None:
    (tmp_path / "executor.toml").write_text("[limits]\nmax_concurrent = 0\n")
    f = tmp_path / "balancer.toml"
    f.write_text("[executor]\nconfig = 'executor.toml'\n")
    r = balancer("config", "check", str(f))
    assert r.returncode == 2
    assert "limits.max_concurrent" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_token_comes_from_the_systemd_credential(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config({"server": {"api_token": "from-config"}})
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert cfg.token() == "from-config"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert cfg.token() == "from-config"  # no credential file: the config's token
    (tmp_path / "api_token").write_text("s3cret\n")
    assert cfg.token() == "s3cret"
    monkeypatch.setenv("BALANCER_API_TOKEN", "from-env")
    assert cfg.token() == "from-env"
    assert json.dumps(dataclasses.asdict(cfg)).count("s3cret") == 0
