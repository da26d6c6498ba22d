"""A restore's execution (``restore.execute``): one plan, taken once, done exactly as planned —
each target re-read before its first write and read back after its last (DESIGN §9)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from atlas_dagster import schema
from atlas_dagster.graph import GraphClient
from atlas_dagster.reasons import (
    PROVIDER_BAD_RESPONSE,
    PROVIDER_CONNECTION_INVALID,
    RESTORE_CONFLICT,
    RESTORE_OUTCOME_UNKNOWN,
    RESTORE_PLAN_EXPIRED,
    RESTORE_REFERENCE_UNMAPPED,
    AtlasError,
    GraphError,
    WriteUncertain,
)
from atlas_dagster.restore import rules
from atlas_dagster.restore import store as plans
from atlas_dagster.restore.plan import REFERENCE_CONTRACTS
from graph_contracts import CONTRACTS, Contract, canonical_json, object_name

if TYPE_CHECKING:  # the assets' log (Dagster's), without importing Dagster here
    from atlas_dagster.assets.common import Log

# Results of an execution's items.
CREATED, UPDATED, UNCHANGED, SKIPPED, BLOCKED = (
    "created",
    "updated",
    "unchanged",
    "skipped",
    "blocked",
)
CONFLICT, FAILED, OUTCOME_UNKNOWN = "conflict", "failed", "outcome_unknown"
FAILED_RESULTS = frozenset({CONFLICT, FAILED, OUTCOME_UNKNOWN, BLOCKED})
# How long to look for an object a create whose answer was lost may have made, and for a write to
# show when read back (Graph replicates): the waits before each look.
LOOKUP_WAITS = (0.0, 1.0, 2.0, 4.0)
READBACK_WAITS = (0.0, 0.5, 1.0, 2.0)


class PlanRefused(AtlasError):
    """A plan that may not be executed (expired, taken, of another tenant)."""


def check_executable(plan: plans.RestorePlan, tenant_id: str | None, now: datetime) -> None:
    """Why a plan may not be executed now, as a PlanRefused; nothing when it may."""
    if plan.interrupted:
        raise PlanRefused(
            RESTORE_CONFLICT,
            f"restore plan #{plan.id} was taken by operation run #{plan.execute_operation_run_id}, "
            f"which ended {plan.execution_outcome} before finishing: a plan executes once, so "
            "make a new plan (it reads what that execution did write)",
        )
    if plan.status != plans.PLANNED:
        raise PlanRefused(
            RESTORE_CONFLICT,
            f"restore plan #{plan.id} is {plan.status}: a plan executes once",
        )
    if plan.expired(now):
        raise PlanRefused(
            RESTORE_PLAN_EXPIRED,
            f"restore plan #{plan.id} expired at {plan.expires_at:%Y-%m-%d %H:%M} UTC: make a "
            "new plan",
        )
    if tenant_id is not None and tenant_id != plan.target_tenant_id:
        raise PlanRefused(
            PROVIDER_CONNECTION_INVALID,
            f"restore plan #{plan.id} was made for tenant {plan.target_tenant_id}, but "
            f"connection {plan.provider_connection!r} now points at tenant {tenant_id}",
        )


@dataclass
class ItemResult:
    position: int
    result: str
    target_id: str | None = None
    verified: bool | None = None
    error: str | None = None
    reason_code: str | None = None
    writes_sent: int = 0


@dataclass
class Execution:
    plan_id: int
    results: list[ItemResult] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        counts = dict(Counter(r.result for r in self.results))
        counts["verified"] = sum(1 for r in self.results if r.verified)
        counts["unverified"] = sum(1 for r in self.results if r.verified is False)
        counts["writes"] = sum(r.writes_sent for r in self.results)
        return counts


class Executor:
    """Executes one taken plan through the client. Items run side by side, references first;
    each item's own writes go one after another in the plan's order."""

    def __init__(
        self,
        client: GraphClient,
        engine: Engine,
        plan: plans.RestorePlan,
        *,
        log: Log,
    ):
        self.client = client
        self.engine = engine
        self.plan = plan
        self.log = log
        # Placeholder → id of each object this execution created (items run on several threads).
        self.created: dict[str, str] = {}
        self._created_lock = threading.Lock()
        # What each collection a create goes to held before this execution wrote anything:
        # (id, type, name) of each object.
        self._listed: dict[str, list[tuple[str, Any, str | None]]] = {}
        self._claimed: set[tuple[str, str]] = set()

    def run(self, items: list[plans.RestoreItem]) -> Execution:
        execution = Execution(self.plan.id)
        todo = [i for i in items if i.action in (rules.CREATE, rules.UPDATE)]
        as_planned = {rules.UNCHANGED: UNCHANGED, rules.SKIP: SKIPPED, rules.BLOCKED: BLOCKED}
        for item in items:
            if item.action in as_planned:
                execution.results.append(
                    ItemResult(
                        item.position,
                        as_planned[item.action],
                        item.target_external_id,
                        reason_code=item.reason_code,
                        error=item.message,
                    )
                )
        self._record(execution.results)
        self._claimed = {(i.contract_key, i.target_external_id or "") for i in items}
        creates = sorted({i.contract_key for i in todo if i.action == rules.CREATE})
        phases = [
            [i for i in todo if i.contract_key in REFERENCE_CONTRACTS],
            [i for i in todo if i.contract_key not in REFERENCE_CONTRACTS],
        ]
        with ThreadPoolExecutor(self.client.concurrency, thread_name_prefix="restore") as pool:
            listed = pool.map(self._list, creates)
            self._listed = dict(zip(creates, listed, strict=True))
            for phase in phases:
                # Each result is recorded as soon as its item ends, from this thread.
                for future in as_completed([pool.submit(self._one, i) for i in phase]):
                    execution.results.append(future.result())
                    self._record([execution.results[-1]])
        execution.results.sort(key=lambda r: r.position)
        return execution

    def _created(self) -> dict[str, str]:
        with self._created_lock:
            return dict(self.created)

    def _record(self, results: list[ItemResult]) -> None:
        now = schema.utcnow()
        plans.record_items(
            self.engine,
            self.plan.id,
            [
                {
                    "position": r.position,
                    "result": r.result,
                    "target_external_id": r.target_id,
                    "verified": r.verified,
                    "error": r.error,
                    "completed_at": now,
                }
                for r in results
            ],
        )

    def _list(self, contract_key: str) -> list[tuple[str, Any, str | None]]:
        contract = CONTRACTS[contract_key]
        return [
            (str(o.get("id")), o.get("@odata.type"), object_name(contract, o))
            for page in self.client.pages(contract_key)
            for o in page
        ]

    def _appeared(self, contract: Contract, item: plans.RestoreItem) -> str | None:
        """An object of the item's type and name that no item of the plan targets: there was
        none when the plan chose to create (it would have matched), so it appeared since."""
        kind = (item.planned_view or {}).get("@odata.type")
        for object_id, odata_type, name in self._listed.get(contract.key, ()):
            if (
                name == item.display_name
                and odata_type == kind
                and (contract.key, object_id) not in self._claimed
            ):
                return object_id
        return None

    def _one(self, item: plans.RestoreItem) -> ItemResult:
        contract = CONTRACTS[item.contract_key]
        result = ItemResult(item.position, FAILED, item.target_external_id)
        try:
            return self._execute(contract, item, result)
        except WriteUncertain as exc:
            result.result, result.reason_code, result.error = (
                OUTCOME_UNKNOWN,
                RESTORE_OUTCOME_UNKNOWN,
                exc.message,
            )
        except GraphError as exc:
            result.result, result.reason_code, result.error = FAILED, exc.reason_code, exc.message
        except Exception as exc:  # one item's surprise must not stop the others
            result.result, result.reason_code = FAILED, PROVIDER_BAD_RESPONSE
            result.error = f"{type(exc).__name__}: {exc}"
        return result

    def _execute(
        self, contract: Contract, item: plans.RestoreItem, result: ItemResult
    ) -> ItemResult:
        writes, missing = rules.resolve_placeholders(item.writes, self._created())
        if missing:
            result.result, result.reason_code = FAILED, RESTORE_REFERENCE_UNMAPPED
            result.error = (
                f"an object this restore was to create first was not created ({', '.join(missing)})"
            )
            return result
        if item.action == rules.UPDATE:
            assert item.target_external_id is not None
            live = self.client.read_object(contract.key, item.target_external_id)
            if (
                live is None
                or rules.view_hash(contract, rules.view(contract, live)) != item.target_hash_at_plan
            ):
                result.result, result.reason_code = CONFLICT, RESTORE_CONFLICT
                result.error = (
                    "the target was deleted since the plan"
                    if live is None
                    else "the target changed since the plan: it is not overwritten"
                )
                return result
        if item.action == rules.CREATE and (appeared := self._appeared(contract, item)):
            result.result, result.reason_code = CONFLICT, RESTORE_CONFLICT
            result.error = (
                f"an object of this name ({appeared}) appeared since the plan: nothing is "
                "created beside it"
            )
            return result
        target_id = item.target_external_id
        for n, write in enumerate(writes):
            key = write["contract_key"]
            if n == 0 and item.action == rules.CREATE:
                target_id = self._create(contract, item, write)
                result.target_id = target_id
                result.writes_sent += 1
                if target_id is None:
                    result.result, result.reason_code = OUTCOME_UNKNOWN, RESTORE_OUTCOME_UNKNOWN
                    result.error = (
                        "the create got no answer, and no new object of this name appeared: "
                        "look in the portal before planning again"
                    )
                    return result
                with self._created_lock:
                    self.created[rules.placeholder(contract.key, item.source_external_id)] = (
                        target_id
                    )
                continue
            self.client.write(
                key, item_id=target_id, sub_id=write.get("sub_id"), body=write.get("body")
            )
            result.writes_sent += 1
        result.result = CREATED if item.action == rules.CREATE else UPDATED
        result.verified = self._verify(contract, item, target_id)
        if not result.verified:
            result.error = "read back, it still differs from the backup"
        return result

    def _create(
        self, contract: Contract, item: plans.RestoreItem, write: Mapping[str, Any]
    ) -> str | None:
        try:
            answer = self.client.write(
                write["contract_key"], item_id=write.get("item_id"), body=write.get("body")
            )
        except WriteUncertain:
            return self._find_created(contract, item)
        if not answer or not answer.get("id"):
            # Graph answered without the object: find it rather than create it again.
            return self._find_created(contract, item)
        return str(answer["id"])

    def _find_created(self, contract: Contract, item: plans.RestoreItem) -> str | None:
        """The object a create whose answer was lost made: same type and name, not among the
        ids the collection held before. Looked for a while (Graph replicates); None when it
        does not appear, or when more than one does."""
        before = {object_id for object_id, _, _ in self._listed.get(contract.key, ())}
        mine = set(self._created().values())
        for wait in LOOKUP_WAITS:
            if wait:
                time.sleep(wait)
            found = [
                str(o.get("id"))
                for page in self.client.pages(contract.key)
                for o in page
                if str(o.get("id")) not in before
                and str(o.get("id")) not in mine
                and object_name(contract, o) == item.display_name
            ]
            if len(found) == 1:
                self.log.info(f"the create of {item.display_name!r} happened: found {found[0]}")
                return found[0]
            if len(found) > 1:
                return None
        return None

    def _verify(self, contract: Contract, item: plans.RestoreItem, target_id: str | None) -> bool:
        """Read the target back and compare it with what the plan wanted (allowing Graph a
        moment to replicate)."""
        if target_id is None:
            return False
        wanted = self._wanted(item)
        if wanted is None:
            return False
        for wait in READBACK_WAITS:
            if wait:
                time.sleep(wait)
            live = self.client.read_object(contract.key, target_id)
            if live is not None and canonical_json(rules.view(contract, live)) == canonical_json(
                wanted
            ):
                return True
        return False

    def _wanted(self, item: plans.RestoreItem) -> dict[str, Any] | None:
        if item.planned_view is None:
            return None
        resolved, _ = rules.resolve_placeholders(item.planned_view, self._created())
        return resolved
