"""The service's inventory: the one cluster snapshot it works from.

Description
    ``Inventory`` holds the current ``ClusterSnapshot`` and keeps it in the store (key
    ``inventory``). It changes in one place, ``replace()``; the edits the service makes (a host
    enters or leaves maintenance, a migration finished, a VM placed, the backend's view of
    where VMs run) go through the snapshot's own edit methods (``with_host_state``,
    ``with_vm_on``, ``with_vm``, ``with_vms``), never through a document round trip. Followers
    ``reload()`` what the leader stored when its version changes. Listeners hear of every
    replacement (the service drops its estimate, the simulated backend follows).
Requirements
    A ``balancer.store.Store``.
Limitations
    The snapshot is immutable; concurrent edits are serialised by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from balancer.errors import InputError
from balancer.model import VM, ClusterSnapshot, HostState
from balancer.snapshot import parse_snapshot, to_dict
from balancer.store import Store


class Inventory:
    def __init__(self, store: Store, *, mem_overcommit: float = 1.0,
                 snapshot: ClusterSnapshot | None = None) -> None:
        self.store = store
        self.mem_overcommit = mem_overcommit
        self._lock = threading.RLock()
        self._snap: ClusterSnapshot | None = None
        self._version: int | None = None
        self.listeners: list[Callable[[ClusterSnapshot], None]] = []
        if snapshot is not None:
            self.replace(snapshot)
        else:
            self.reload(force=True, notify=False)

    @property
    def snapshot(self) -> ClusterSnapshot | None:
        return self._snap

    # -- the one place it changes ----------------------------------------------------------
    def replace(self, snap: ClusterSnapshot, *, persist: bool = True,
                notify: bool = True) -> ClusterSnapshot:
        with self._lock:
            self._snap = snap
            if persist:
                self.store.put("inventory", to_dict(snap))
                self._version = self.store.version("inventory")
        if notify:
            for fn in self.listeners:
                fn(snap)
        return snap

    def reload(self, *, force: bool = False, notify: bool = True) -> bool:
        """Take the inventory stored by the leader if it changed; True if it did."""
        v = self.store.version("inventory")
        if not force and v == self._version:
            return False
        doc = self.store.get("inventory")
        self._version = v
        if doc is None:
            return False
        self.replace(parse_snapshot(doc, mem_overcommit=self.mem_overcommit), persist=False,
                     notify=notify)
        return True

    def set(self, doc: Any) -> ClusterSnapshot:
        """A whole new inventory from a snapshot document (validated)."""
        return self.replace(parse_snapshot(doc, mem_overcommit=self.mem_overcommit))

    # -- edits -----------------------------------------------------------------------------
    def _edit(self, fn: Callable[[ClusterSnapshot], ClusterSnapshot]) -> ClusterSnapshot:
        with self._lock:
            snap = self._snap
            if snap is None:
                raise InputError("no inventory yet")
            return self.replace(fn(snap))

    def set_host_state(self, host: str, state: HostState) -> ClusterSnapshot:
        def edit(s: ClusterSnapshot) -> ClusterSnapshot:
            out = s.with_host_state(host, state)
            short = out.mem_shortfall(self.mem_overcommit)
            if short > 0:  # the remaining hosts must be able to hold every VM
                raise InputError(f"host {host}: cannot enter {state.value}: the other active "
                                 f"hosts lack {short:.0f} MiB for the VMs' configured memory")
            return out
        return self._edit(edit)

    def move_vm(self, vm: str, host: str) -> None:
        with self._lock:
            s = self._snap
            if s is None or vm not in s.vm_index or host not in s.host_index or \
                    s.vms[s.vm_index[vm]].host == host:
                return
            self.replace(s.with_vm_on(vm, host))

    def add_vm(self, vm: VM) -> ClusterSnapshot:
        return self._edit(lambda s: s.with_vm(vm))

    def follow(self, where: Iterable[tuple[str, str, int, int]]) -> ClusterSnapshot | None:
        """Take placement from the backend: ``(name, host, vcpus, mem_mb)`` of every VM it
        runs. VMs it no longer runs are dropped, new ones added (demand unknown: 0)."""
        with self._lock:
            s = self._snap
            if s is None:
                return None
            seen = {name: (host, vcpus, mem) for name, host, vcpus, mem in where}
            vms = []
            changed = False
            for v in s.vms:
                got = seen.pop(v.name, None)
                if got is None:
                    changed = True
                    continue
                if got[0] in s.host_index and got[0] != v.host:
                    v = replace(v, host=got[0])
                    changed = True
                vms.append(v)
            for name, (host, vcpus, mem) in seen.items():
                if host in s.host_index:
                    vms.append(VM(name=name, host=host, vcpus=vcpus, mem=mem, cpu_demand=0,
                                  mem_demand=0))
                    changed = True
            if not changed:
                return s
            return self.replace(s.with_vms(tuple(vms)))
