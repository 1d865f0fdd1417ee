"""Release bits: one version (pyproject, read at run time), the licence, the changelog."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_flag_prints_the_pyproject_version() -> None:
    out = subprocess.run([sys.executable, "-m", "balancer.cli", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"balancer {PYPROJECT['project']['version']}"
    assert out.stderr == ""


def test_license_is_the_apache_text_pyproject_names() -> None:
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_changelog_has_an_entry_for_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{PYPROJECT['project']['version']}]" in text


def test_httpx_is_a_core_dependency() -> None:
    # `balancer serve` always loads the Prometheus source (balancer.ingest.prometheus, httpx):
    # README's first command installs no extras, so httpx must be a core dependency.
    deps = [d.split(">")[0].split("=")[0].strip() for d in PYPROJECT["project"]["dependencies"]]
    assert "httpx" in deps


def test_ci_runs_readme_test_command_verbatim_then_the_demo_smoke_check() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)\n```", readme, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
    lines = ci.splitlines()
    assert lines.index(test_cmd) < lines.index("python3 .ci/smoke_demo.py readme")


def test_ci_then_builds_the_release_and_serves_the_demo_from_the_wheel() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines.index("python3 .ci/smoke_demo.py readme") < lines.index(
        "bash .ci/release_check.sh")
    script = (ROOT / ".ci" / "release_check.sh").read_text()
    assert "python -m build" in script and "smoke_demo.py binary" in script
    assert "--version" in script
