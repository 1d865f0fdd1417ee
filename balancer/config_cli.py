"""``balancer config``: check a service config, or print the documented full config.

``balancer config check FILE`` validates FILE with the code ``balancer serve --config FILE``
runs at start (``balancer.config.load_config``, then the executor config it names and the
inventory snapshot it names): ``FILE: ok`` and exit 0, or one line naming the file, section and
key at fault and exit 2. ``balancer config example`` prints every section and key with its
default and a comment (``balancer.config.example_config``, generated from the dataclasses the
daemon parses into).
"""

from __future__ import annotations

import argparse
import sys

HELP = "check a service config file, or print the documented full config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="{check,example}",
                                parser_class=type(parser))
    p = sub.add_parser("check", help="validate FILE as `balancer serve --config FILE` would "
                                     "(exit 2 with the field named)")
    p.add_argument("file", metavar="FILE", help="service config (TOML)")
    sub.add_parser("example", help="print the full config: every key, its default, a comment")


def check(path: str) -> list[str]:
    """Validate ``path`` as the daemon does at start; a few facts about it (raises
    ``InputError`` naming the field)."""
    from balancer.config import load_config
    from balancer.executor.config import load_config as load_exec_config

    cfg = load_config(path)
    if cfg.executor.config is not None:
        load_exec_config(cfg.executor.config)
    facts = [f"source {cfg.ingest.source}", f"automation {cfg.cluster.automation}",
             f"executor {cfg.executor.backend}", f"store {cfg.store.path}",
             f"listen {cfg.server.host}:{cfg.server.port}"]
    if cfg.power.automation != "off":
        facts.append(f"power {cfg.power.automation}"
                     + ("" if cfg.power.command else " (no command: state changes only)"))
    if cfg.cluster.inventory is not None:
        from balancer import snapshot

        snap = snapshot.load(cfg.cluster.inventory, mem_overcommit=cfg.cluster.mem_overcommit)
        facts.append(f"inventory {len(snap.hosts)} hosts, {len(snap.vms)} VMs")
    return facts


def run(args: argparse.Namespace) -> int:
    if args.config_command == "example":
        from balancer.config import example_config

        sys.stdout.write(example_config())
        return 0
    facts = check(args.file)
    print(f"{args.file}: ok ({', '.join(facts)})")
    return 0
