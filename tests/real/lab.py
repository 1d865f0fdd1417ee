"""A two-host lab on one machine, for the real-backend tests and the migration benchmark.

Two network namespaces joined by a veth pair, addresses on a private /30 that exist only inside
them; the tiny test guest (guest/*.c, *.S) built with the machine's gcc/ld; one ``libvirtd`` per
namespace with its own state directories. Everything started here is registered so ``close()``
removes it even after a failure: guests first (libvirt daemonizes them, deleting a namespace
does not kill its processes), then daemons, then the namespaces.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

GUEST_SRC = Path(__file__).parent / "guest"
PREFIX = "blr"  # namespace/veth names: blr<pid>x<n><a|b>


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def build_guest(out_dir: Path) -> Path:
    """Compile the multiboot test guest into ``out_dir/guest.elf``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-m32", "-ffreestanding", "-fno-pic", "-fno-stack-protector", "-O2", "-c"]
    run("gcc", *flags, str(GUEST_SRC / "guest.c"), "-o", str(out_dir / "guest.o"))
    run("gcc", "-m32", "-c", str(GUEST_SRC / "boot.S"), "-o", str(out_dir / "boot.o"))
    elf = out_dir / "guest.elf"
    run("ld", "-m", "elf_i386", "--no-warn-rwx-segments", "-T", str(GUEST_SRC / "guest.ld"),
        "-o", str(elf), str(out_dir / "boot.o"), str(out_dir / "guest.o"))
    return elf


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_netns_processes(ns: str) -> None:
    """SIGKILL every process in ``ns`` and wait until they are gone (at most 5 s)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        out = run("ip", "netns", "pids", ns, check=False).stdout.split()
        pids = [int(p) for p in out if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def sweep_leftovers() -> None:
    """Remove namespaces of earlier runs whose creating process is dead (a crashed run)."""
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)x\d+[ab]", name)
        if m and not _pid_alive(int(m.group(1))):
            kill_netns_processes(name)
            run("ip", "netns", "del", name, check=False)


_counter = 0


@dataclass
class Host:
    """One lab host: a namespace, its address, its own folder for run state and logs."""

    name: str
    ns: str
    veth: str
    address: str
    root: Path

    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns)

    def sh(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.exec_prefix(), *cmd, check=check)


@dataclass
class Lab:
    """Two hosts ``a`` and ``b`` (namespaces joined by a veth pair) under ``root``."""

    root: Path
    hosts: list[Host] = field(default_factory=list)
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cleanups: list = field(default_factory=list)

    @classmethod
    def create(cls, root: Path, subnet: int = 0) -> Lab:
        global _counter
        _counter += 1
        tag = f"{PREFIX}{os.getpid()}x{_counter}"
        lab = cls(root)
        try:
            for i, side in enumerate("ab"):
                h = Host(name=f"host-{side}", ns=f"{tag}{side}", veth=f"{tag}{side}",
                         address=f"10.199.{subnet}.{i + 1}", root=root / f"host-{side}")
                h.root.mkdir(parents=True, exist_ok=True)
                run("ip", "netns", "add", h.ns)
                lab.hosts.append(h)
            a, b = lab.hosts
            run("ip", "link", "add", a.veth, "netns", a.ns, "type", "veth",
                "peer", "name", b.veth, "netns", b.ns)
            for h in lab.hosts:
                h.sh("ip", "link", "set", "lo", "up")
                h.sh("ip", "addr", "add", f"{h.address}/30", "dev", h.veth)
                h.sh("ip", "link", "set", h.veth, "up")
        except BaseException:
            lab.close()
            raise
        return lab

    @property
    def a(self) -> Host:
        return self.hosts[0]

    @property
    def b(self) -> Host:
        return self.hosts[1]

    def shape(self, mbit: float | None) -> None:
        """Limit the veth to ``mbit`` Mbit/s both ways with a token bucket (None: no limit)."""
        for h in self.hosts:
            h.sh("tc", "qdisc", "del", "dev", h.veth, "root", check=False)
            if mbit:
                burst = max(32 * 1024, int(mbit * 1e6 / 8 / 250))  # ~4 ms of traffic
                h.sh("tc", "qdisc", "add", "dev", h.veth, "root", "tbf", "rate", f"{mbit}mbit",
                     "burst", str(burst), "latency", "50ms")

    def close(self) -> None:
        errors: list[BaseException] = []
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:  # keep cleaning; report at the end
                errors.append(exc)
        self.cleanups.clear()
        for h in self.hosts:  # guests and daemons inside the namespaces
            kill_netns_processes(h.ns)
        for p in self.daemons:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(5)
        self.daemons.clear()
        for h in self.hosts:
            run("ip", "netns", "del", h.ns, check=False)
        self.hosts.clear()
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------- libvirtd per host

LIBVIRT_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
                "/var/cache/libvirt")


def libvirt_socket(h: Host) -> Path:
    return h.root / "libvirt" / "run/libvirt/libvirt-sock"


def start_libvirtd(lab: Lab, h: Host, port_base: int = 49152) -> str:
    """Start one libvirtd inside ``h``'s namespace with its own state; return its local URI.

    libvirt's fixed paths are bind-mounted from ``h.root/libvirt`` inside the mount namespace
    that ``ip netns exec`` creates, so the two daemons never share state. The daemon listens on
    TCP on the namespace address (auth none: test namespaces only) for peer-to-peer migration.
    """
    base = h.root / "libvirt"
    for d in LIBVIRT_DIRS:
        (base / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    etc = base / "etc/libvirt"
    src_etc = Path("/etc/libvirt")
    for f in src_etc.iterdir() if src_etc.is_dir() else []:
        if f.is_file() and f.suffix == ".conf" and f.name not in ("libvirtd.conf", "qemu.conf"):
            shutil.copy(f, etc / f.name)
    (etc / "libvirtd.conf").write_text(
        f'listen_tcp = 1\nlisten_tls = 0\nlisten_addr = "{h.address}"\nauth_tcp = "none"\n'
        f'auth_unix_rw = "none"\nunix_sock_group = "root"\nunix_sock_rw_perms = "0770"\n'
        f'host_uuid = "{uuid.uuid4()}"\nlog_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        'max_clients = 64\n')
    (etc / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\n'
        'cgroup_controllers = [ ]\nstdio_handler = "file"\n'
        f'migration_host = "{h.address}"\nmigration_address = "{h.address}"\n'
        f'migration_port_min = {port_base}\nmigration_port_max = {port_base + 63}\n')
    mounts = " && ".join(f"mkdir -p {d} && mount --bind {base}{d} {d}" for d in LIBVIRT_DIRS)
    pidfile = base / "libvirtd.pid"
    log = open(h.root / "libvirtd.out", "wb")  # noqa: SIM115 - owned by the daemon's lifetime
    proc = subprocess.Popen(
        [*h.exec_prefix(), "sh", "-c",
         f"{mounts} && exec libvirtd --listen --pid-file {pidfile}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    lab.daemons.append(proc)
    sock = libvirt_socket(h)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"libvirtd on {h.name} exited: "
                               f"{(h.root / 'libvirtd.out').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirtd on {h.name} did not create {sock}")
        time.sleep(0.05)
    return f"qemu+unix:///system?socket={sock}"
