"""``/v1/inventory``: the hosts, VMs and rules the service manages."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Annotated, Any

from fastapi import APIRouter, Body

from balancer.api.deps import WRITE_AUTH, ControllerDep
from balancer.api.errors import responses
from balancer.api.models import InventoryAccepted, snapshot_schema

router = APIRouter(tags=["ingest"])


@router.post("/v1/inventory", response_model=InventoryAccepted, dependencies=[WRITE_AUTH],
             responses=responses(400, 401, 403, 409, 413, 422))
def post_inventory(doc: Annotated[dict[str, Any], Body(json_schema_extra=snapshot_schema())],
                   controller: ControllerDep) -> InventoryAccepted:
    """Replace the inventory (hosts, VMs, rules) with a snapshot v1 document.

    Validated like a snapshot file (names printable and bounded, capacities in physical
    ranges), so nothing accepted here can break a later read."""
    snap = controller.set_inventory(doc)
    return InventoryAccepted(hosts=len(snap.hosts), vms=len(snap.vms), rules=len(snap.rules))
