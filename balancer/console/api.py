"""The JSON endpoints the console needs beyond the core API (under ``/v1``, in the OpenAPI).

- ``GET /v1/automation``: the cluster's automation level, migration threshold, budget and the
  per-VM overrides;
- ``PUT /v1/automation`` (token): change the level, threshold or budget (fields left out stay);
- ``PUT /v1/automation/vms/{vm}`` / ``DELETE ...`` (token): set or remove a VM's override;
- ``POST /v1/whatif/current``: the plan for the cluster as the service sees it now (estimated
  demand, holds, rules) at a chosen threshold or budget; changes nothing;
- ``GET /v1/auth`` (token): 200 when the bearer token is right (the console's sign-in check).

Changes are applied to the running controller's configuration (the next cycle uses them) and
kept in the store (``console.automation``), so they survive a restart; they win over the config
file's ``[cluster] automation``, ``threshold``, ``max_migrations`` and ``[cluster.vm_automation]``
until changed again here.
"""

# No "from __future__ import annotations": FastAPI must see the local Annotated aliases.

import dataclasses
import logging
import secrets
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from balancer.config import LEVELS, VM_LEVELS

log = logging.getLogger("balancer.console")
STORE_KEY = "console.automation"

Level = Literal["manual", "partially", "fully"]
VMLevel = Literal["disabled", "manual", "partially", "fully"]
assert set(Level.__args__) == set(LEVELS) and set(VMLevel.__args__) == set(VM_LEVELS)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AutomationChange(_In):
    automation: Level | None = Field(None, description="cluster automation level")
    threshold: int | None = Field(None, ge=1, le=5, description="migration threshold 1..5")
    max_migrations: int | None = Field(
        None, ge=0, le=100_000, description="migrations per cycle (null: no budget)")


class VMOverride(_In):
    level: VMLevel


class Automation(BaseModel):
    automation: Level
    threshold: int
    max_migrations: int | None
    vm_automation: dict[str, VMLevel]


class CurrentWhatIf(_In):
    threshold: int = Field(3, ge=1, le=5)
    max_migrations: int | None = Field(None, ge=0, le=100_000)
    time_limit_s: float | None = Field(None, gt=0, le=10)


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


def restore_automation(controller: Any) -> None:
    """Re-apply the changes made from the console before a restart (kept in the store)."""
    saved = controller.store.get(STORE_KEY)
    if not isinstance(saved, dict):
        return
    try:
        a = Automation.model_validate(saved)
    except ValueError as exc:
        log.warning("ignoring saved console automation settings: %s", exc)
        return
    cfg = controller.cfg
    controller.cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(
        cfg.cluster, automation=a.automation, threshold=a.threshold,
        max_migrations=a.max_migrations, vm_automation=dict(a.vm_automation)))


def automation_router(controller: Any, get_token: Callable[[], str | None]) -> APIRouter:
    router = APIRouter()
    bearer = HTTPBearer(auto_error=False, description="the API token")

    def require_token(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        expected = get_token()
        if not expected:
            raise HTTPException(403, detail=[{
                "loc": ["header", "authorization"],
                "msg": "mutating endpoints are disabled: no API token configured "
                       "(set [server] api_token or BALANCER_API_TOKEN)"}])
        if cred is None or not secrets.compare_digest(cred.credentials.encode(),
                                                      expected.encode()):
            raise HTTPException(401, detail=[{"loc": ["header", "authorization"],
                                              "msg": "missing or wrong bearer token"}],
                                headers={"WWW-Authenticate": "Bearer"})

    Auth = Depends(require_token)
    VMName = Annotated[str, Path(min_length=1, max_length=253)]

    @router.get("/v1/auth", tags=["console"], dependencies=[Auth])
    def check_token() -> dict[str, bool]:
        """200 when the bearer token is right (401 wrong or missing, 403 none configured)."""
        return {"ok": True}

    @router.get("/v1/automation", response_model=Automation, tags=["automation"])
    def get_automation() -> Automation:
        """Cluster automation level, migration threshold, budget and per-VM overrides."""
        return _current(controller)

    @router.put("/v1/automation", response_model=Automation, tags=["automation"],
                dependencies=[Auth])
    def put_automation(change: AutomationChange) -> Automation:
        """Change the level, threshold or budget; fields left out are kept (next cycle on)."""
        fields = change.model_fields_set
        updates: dict[str, Any] = {}
        if "automation" in fields:
            if change.automation is None:
                raise HTTPException(422, detail=[{"loc": ["body", "automation"],
                                                  "msg": "must be one of "
                                                         + ", ".join(LEVELS)}])
            updates["automation"] = change.automation
        if "threshold" in fields:
            if change.threshold is None:
                raise HTTPException(422, detail=[{"loc": ["body", "threshold"],
                                                  "msg": "must be a whole number 1..5"}])
            updates["threshold"] = change.threshold
        if "max_migrations" in fields:
            updates["max_migrations"] = change.max_migrations
        return _set(controller, **updates)

    def _known(vm: str) -> None:
        inv = controller.inventory
        if inv is None:
            raise HTTPException(503, detail=[{"loc": [], "msg": "no inventory yet"}])
        if vm not in inv.vm_index:
            raise HTTPException(404, detail=[{"loc": ["path", "vm"],
                                              "msg": f"VM {vm!r} is not in the inventory"}])

    @router.put("/v1/automation/vms/{vm}", response_model=Automation, tags=["automation"],
                dependencies=[Auth])
    def put_vm_override(vm: VMName, body: VMOverride) -> Automation:
        """Set a VM's own automation level (``disabled``: never moved)."""
        _known(vm)
        overrides = dict(controller.cfg.cluster.vm_automation)
        overrides[vm] = body.level
        return _set(controller, vm_automation=overrides)

    @router.delete("/v1/automation/vms/{vm}", response_model=Automation, tags=["automation"],
                   dependencies=[Auth])
    def delete_vm_override(vm: VMName) -> Automation:
        """Remove a VM's override: it follows the cluster's level again."""
        overrides = dict(controller.cfg.cluster.vm_automation)
        if vm not in overrides:
            raise HTTPException(404, detail=[{"loc": ["path", "vm"],
                                              "msg": f"VM {vm!r} has no override"}])
        del overrides[vm]
        return _set(controller, vm_automation=overrides)

    @router.post("/v1/whatif/current", tags=["planning"])
    def whatif_current(req: CurrentWhatIf) -> dict[str, Any]:
        """The plan for the cluster as the service sees it now; changes nothing."""
        from balancer.snapshot import to_dict

        doc = to_dict(controller.current_view().snapshot)
        out = controller.whatif(doc, req.threshold, req.max_migrations, req.time_limit_s)
        out.pop("snapshot", None)  # the caller has it; keep the answer small
        return out

    return router
