"""``/v1/automation``: the cluster's automation level, threshold, budget and per-VM overrides;
``/v1/whatif/current`` (the plan for the cluster as the service sees it now) and ``/v1/auth``
(a token check for the web console's sign-in).

- ``GET /v1/automation``: level, migration threshold, budget per cycle, per-VM overrides;
- ``PUT /v1/automation`` (token): change the level, threshold or budget (fields left out stay);
- ``PUT /v1/automation/vms/{vm}`` / ``DELETE ...`` (token): set or remove a VM's override;
- ``POST /v1/whatif/current`` (token, a solver slot): the plan for the current estimate
  (demand, holds, rules) at a chosen threshold or budget; changes nothing;
- ``GET /v1/auth`` (token): 200 when the bearer token is right.

Changes are applied to the running controller's configuration (the next cycle uses them) and
kept in the store (``console.automation``), so they survive a restart (``restore``); they win
over the config file's ``[cluster] automation``, ``threshold``, ``max_migrations`` and
``[cluster.vm_automation]`` until changed again.
"""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

import dataclasses
import logging
import threading
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field

from balancer.api.deps import NO_BODY, WRITE_AUTH, ControllerDep, SolverDep
from balancer.api.errors import item, responses
from balancer.api.models import Budget, Threshold
from balancer.config import LEVELS, VM_LEVELS
from balancer.snapshot import MAX_NAME

log = logging.getLogger("balancer.api")
STORE_KEY = "console.automation"
_lock = threading.Lock()  # one read-modify-write of the config at a time

Level = Literal["manual", "partially", "fully"]
VMLevel = Literal["disabled", "manual", "partially", "fully"]
assert set(Level.__args__) == set(LEVELS) and set(VMLevel.__args__) == set(VM_LEVELS)

router = APIRouter(tags=["automation"])
VMName = Annotated[str, Path(min_length=1, max_length=MAX_NAME)]


class _In(BaseModel):
    # strict: what the schema says is what is accepted (false is not 0, "1" is not 1)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class AutomationChange(_In):
    # Optional but never null (the schema says so); max_migrations may be null: no budget.
    automation: Level = Field(None, description="cluster automation level")  # type: ignore[assignment]
    threshold: Threshold = Field(None,  # type: ignore[assignment]
                                 description="migration threshold 1..5")
    max_migrations: Budget | None = Field(
        None, description="migrations per cycle (null: no budget)")


class VMOverride(_In):
    level: VMLevel


class Automation(BaseModel):
    automation: Level
    threshold: int
    max_migrations: int | None
    vm_automation: dict[str, VMLevel]


class CurrentWhatIf(_In):
    threshold: Threshold = 3
    max_migrations: Budget | None = None
    time_limit_s: float | None = Field(None, gt=0, le=30)


def _current(controller: Any) -> Automation:
    c = controller.cfg.cluster
    return Automation(automation=c.automation, threshold=c.threshold,
                      max_migrations=c.max_migrations, vm_automation=dict(c.vm_automation))


def _set(controller: Any, **changes: Any) -> Automation:
    cfg = controller.cfg
    controller.cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster,
                                                                          **changes))
    out = _current(controller)
    controller.store.put(STORE_KEY, out.model_dump())
    return out


def restore(controller: Any) -> None:
    """Re-apply the changes made over this API before a restart (kept in the store)."""
    saved = controller.store.get(STORE_KEY)
    if not isinstance(saved, dict):
        return
    try:
        a = Automation.model_validate(saved)
    except ValueError as exc:
        log.warning("ignoring saved automation settings: %s", exc)
        return
    cfg = controller.cfg
    controller.cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(
        cfg.cluster, automation=a.automation, threshold=a.threshold,
        max_migrations=a.max_migrations, vm_automation=dict(a.vm_automation)))


def _bad(status: int, loc: list[Any], msg: str, type_: str) -> HTTPException:
    return HTTPException(status, detail=[item(loc, msg, type_)])


@router.get("/v1/auth", dependencies=[WRITE_AUTH], responses=responses(401, 403),
            tags=["console"])
def check_token() -> dict[str, bool]:
    """200 when the bearer token is right (401 wrong or missing, 403 none configured)."""
    return {"ok": True}


@router.get("/v1/automation", response_model=Automation)
def get_automation(controller: ControllerDep) -> Automation:
    """Cluster automation level, migration threshold, budget and per-VM overrides."""
    return _current(controller)


@router.put("/v1/automation", response_model=Automation, dependencies=[WRITE_AUTH],
            responses=responses(401, 403, 413, 422))
def put_automation(change: AutomationChange, controller: ControllerDep) -> Automation:
    """Change the level, threshold or budget; fields left out are kept (next cycle on)."""
    fields = change.model_fields_set
    updates: dict[str, Any] = {}
    if "automation" in fields:
        updates["automation"] = change.automation
    if "threshold" in fields:
        updates["threshold"] = change.threshold
    if "max_migrations" in fields:
        updates["max_migrations"] = change.max_migrations
    with _lock:
        return _set(controller, **updates)


@router.put("/v1/automation/vms/{vm}", response_model=Automation, dependencies=[WRITE_AUTH],
            responses=responses(401, 403, 404, 413, 422, 503))
def put_vm_override(vm: VMName, body: VMOverride, controller: ControllerDep) -> Automation:
    """Set a VM's own automation level (``disabled``: never moved)."""
    inv = controller.inventory
    if inv is None:
        raise _bad(503, [], "no inventory yet", "unavailable")
    if vm not in inv.vm_index:
        raise _bad(404, ["path", "vm"], f"VM {vm!r} is not in the inventory", "not_found")
    with _lock:
        overrides = dict(controller.cfg.cluster.vm_automation)
        overrides[vm] = body.level
        return _set(controller, vm_automation=overrides)


@router.delete("/v1/automation/vms/{vm}", response_model=Automation,
               dependencies=[WRITE_AUTH, NO_BODY], responses=responses(401, 403, 404, 413, 422))
def delete_vm_override(vm: VMName, controller: ControllerDep) -> Automation:
    """Remove a VM's override: it follows the cluster's level again."""
    with _lock:
        overrides = dict(controller.cfg.cluster.vm_automation)
        if vm not in overrides:
            raise _bad(404, ["path", "vm"], f"VM {vm!r} has no override", "not_found")
        del overrides[vm]
        return _set(controller, vm_automation=overrides)


@router.post("/v1/whatif/current", dependencies=[WRITE_AUTH], tags=["planning"],
             responses=responses(401, 403, 409, 413, 422, 429, 503))
async def whatif_current(req: CurrentWhatIf, controller: ControllerDep,
                         solver: SolverDep) -> dict[str, Any]:
    """The plan for the cluster as the service sees it now; changes nothing.

    Needs the token (it is computation) and a solver slot, as ``POST /v1/whatif``."""
    from balancer.snapshot import to_dict

    limit = req.time_limit_s
    if limit is not None:
        limit = min(limit, solver.wall_s)

    def run() -> dict[str, Any]:
        doc = to_dict(controller.current_view().snapshot)
        out: dict[str, Any] = controller.whatif(doc, req.threshold, req.max_migrations, limit)
        out.pop("snapshot", None)  # the caller has it; keep the answer small
        return out

    return await solver.run(run)
