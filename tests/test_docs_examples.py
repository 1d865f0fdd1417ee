"""Every example in the docs works: a user copies them first.

* every ```json block is valid JSON, and a snapshot-shaped one passes the snapshot validator
  and is planned by ``balancer plan``;
* every ```toml block is a valid service or executor config;
* every ``balancer ...`` command line in a code block (not a synopsis with ``[OPTIONS]`` or
  ``A|B``) is accepted by the real argument parser.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from balancer.cli import build_parser
from balancer.snapshot import parse_snapshot

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SERVICE_SECTIONS = {"server", "loop", "cluster", "ingest", "prometheus", "executor", "store"}


def blocks(lang: str) -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        for m in FENCE.finditer(path.read_text()):
            if m.group(1) == lang:
                line = path.read_text()[: m.start()].count("\n") + 1
                out.append((f"{path.relative_to(ROOT)}:{line}", m.group(2)))
    return out


def commands() -> list[tuple[str, str]]:
    """``balancer ...`` example lines of plain code blocks (continuations joined)."""
    out = []
    for where, text in blocks(""):
        text = text.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip().removeprefix("$ ")
            for part in re.split(r"\s+\|\s+|\s+&&\s+", line):
                part = part.strip()
                if not part.startswith("balancer ") or "─" in part:
                    continue
                # a synopsis, not an example: optional parts, alternatives, placeholders
                if re.search(r"\[|\||\.\.\.|…|<", part) or re.search(r"\b[A-Z]{2,}\b", part):
                    continue
                out.append((where, part))
    return out


@pytest.mark.parametrize(("where", "text"), blocks("json"), ids=lambda x: str(x)[:40])
def test_json_examples_are_valid(where: str, text: str) -> None:
    doc = json.loads(text)
    if isinstance(doc, dict) and "hosts" in doc and "version" in doc:
        parse_snapshot(doc)


@pytest.mark.parametrize(("where", "text"), blocks("toml"), ids=lambda x: str(x)[:40])
def test_toml_examples_are_valid_configs(where: str, text: str) -> None:
    data = tomllib.loads(text)
    if set(data) & SERVICE_SECTIONS and not set(data) & {"backend", "migration", "limits"}:
        from balancer.config import parse_config

        parse_config(data)
    else:
        from balancer.executor.config import parse_config as parse_executor_config

        parse_executor_config(data, source=where)


@pytest.mark.parametrize(("where", "line"), commands(), ids=lambda x: str(x)[:60])
def test_command_examples_parse(where: str, line: str) -> None:
    argv = shlex.split(line)[1:]
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        build_parser(command).parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --version / --help: accepted, printed, done
            return
        pytest.fail(f"{where}: `{line}` is refused by the parser (exit {exc.code})")


def test_snapshot_format_example_plans(tmp_path: Path) -> None:
    (where, text), = [b for b in blocks("json") if b[0].startswith("docs/snapshot-format.md")]
    path = tmp_path / "example.json"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "balancer.cli", "plan", str(path), "--time-limit",
                        "5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    # the example's broken rules are fixed by the plan
    reasons = " ".join(m["reason"] for m in doc["migrations"])
    assert "web-spread" in reasons and "app-db" in reasons


def test_examples_were_found() -> None:
    assert blocks("json") and blocks("toml") and commands()
