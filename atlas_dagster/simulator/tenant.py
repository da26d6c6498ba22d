"""A simulated Microsoft 365 tenant: Intune policies and Entra ID groups, deterministic from a
size profile and a seed, and mutable between syncs.

Policies are materialised per contract on first use, each contract from its own seeded random
stream (so the order of use does not matter while the groups, which assignments draw from, are
unchanged). Groups are never materialised: group ``i`` is
regenerated from ``(seed, i)`` on demand, and edits, additions and deletions live in an overlay.
Every group change appends to a change log whose sequence numbers delta tokens refer to.
"""

from __future__ import annotations

import copy
import hashlib
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from atlas_dagster.simulator import payloads as p
from atlas_dagster.simulator.odata import contract_shape, shape
from graph_contracts import CONTRACTS, POLICY_CONTRACTS, Contract, is_builtin

_EPOCH_TS = int(p.EPOCH.timestamp())
# Directory objects a tenant holds besides its policies; a generated tenant has none (a test
# adds them with add_policy), so no profile's reads change.
DIRECTORY_OBJECTS = frozenset({"named_locations", "users"})


@dataclass(frozen=True)
class Profile:
    per_type: tuple[int, int]
    groups: int
    settings: tuple[int, int]
    # Settings catalog policies forced to this many settings or more (several pages of 25).
    big_settings: int = 0


PROFILES: dict[str, Profile] = {
    "small": Profile(per_type=(3, 8), groups=200, settings=(3, 30)),
    # About 500 policies, the size of a typical managed business tenant (the benchmarks' tenant).
    "standard": Profile(per_type=(12, 25), groups=1_000, settings=(5, 40), big_settings=61),
    "medium": Profile(per_type=(30, 80), groups=2_000, settings=(3, 40)),
    "large": Profile(per_type=(45, 55), groups=10_000, settings=(10, 50), big_settings=61),
    "xlarge": Profile(per_type=(190, 230), groups=200_000, settings=(3, 30), big_settings=61),
}

_DEPARTMENTS = ("Finance", "HR", "Sales", "IT", "Legal", "Marketing", "Ops", "R&D", "Support")
_ROLES = ("Users", "Devices", "Pilot", "Admins", "Kiosk", "BYOD", "Contractors", "Managers")
_MASK_BITS = 48
_GROUP_TYPE = p.G + "group"


@dataclass(frozen=True)
class _GroupNames:
    nickname: str
    description: str
    display: str
    unified: str


_GROUP_NAMES = [
    [
        _GroupNames(
            f"{department.lower().replace('&', '')}-{role.lower()}",
            f"{department} {role.lower()}",
            f"{department}-{role}",
            f"{department} {role} (Microsoft 365)",
        )
        for role in _ROLES
    ]
    for department in _DEPARTMENTS
]


def _derive_guid(*parts: object) -> str:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


class SimulatedTenant:
    """One tenant's directory groups and Intune configuration."""

    def __init__(self, profile: str, seed: int):
        if profile not in PROFILES:
            raise ValueError(
                f"unknown simulator profile {profile!r} (one of {', '.join(PROFILES)})"
            )
        self.profile = profile
        self.seed = seed
        self.spec = PROFILES[profile]
        self.tenant_id = _derive_guid("tenant", profile, seed)
        self.client_id = _derive_guid("client", profile, seed)
        self.lock = threading.RLock()
        self._mask = int(hashlib.sha256(f"mask|{seed}".encode()).hexdigest(), 16) % (
            1 << _MASK_BITS
        )
        self._policies: dict[str, dict[str, dict[str, Any]]] = {}
        self._group_edits: dict[str, dict[str, Any]] = {}
        self._added_groups: dict[str, dict[str, Any]] = {}
        self._added_order: list[str] = []
        self._deleted_groups: dict[str, str] = {}  # id -> "changed" (soft) | "deleted" (hard)
        self._changes: list[tuple[int, str]] = []
        self._seq = 0
        self._ids = random.Random(f"ids|{profile}|{seed}")
        self._clock = p.EPOCH + timedelta(days=200)

    @classmethod
    def generate(cls, profile: str = "small", seed: int = 1) -> SimulatedTenant:
        return cls(profile, seed)

    # --- clock and change log ----------------------------------------------------------------

    def _tick(self) -> str:
        self._clock += timedelta(minutes=1)
        return p.stamp(self._clock)

    @property
    def change_sequence(self) -> int:
        """The sequence number of the newest group change (delta tokens carry one)."""
        return self._seq

    def _log_group_change(self, group_id: str) -> None:
        self._seq += 1
        self._changes.append((self._seq, group_id))

    def group_changes_since(self, sequence: int, until: int | None = None) -> list[str]:
        """Group ids changed after ``sequence`` (up to ``until``), each once, in order of their
        last change."""
        with self.lock:
            latest: dict[str, int] = {}
            for seq, group_id in self._changes:
                if seq > sequence and (until is None or seq <= until):
                    latest[group_id] = seq
            return sorted(latest, key=latest.__getitem__)

    # --- groups ------------------------------------------------------------------------------

    @property
    def base_group_count(self) -> int:
        return self.spec.groups

    @property
    def group_count(self) -> int:
        with self.lock:
            # Every deleted id is a base or an added group, deleted once.
            return self.spec.groups + len(self._added_groups) - len(self._deleted_groups)

    def _base_group_id(self, index: int) -> str:
        digest = hashlib.blake2b(f"{self.seed}|{index}".encode(), digest_size=10).hexdigest()
        tail = f"{index ^ self._mask:012x}"
        return f"{digest[:8]}-{digest[8:12]}-4{digest[12:15]}-{'89ab'[index % 4]}{digest[15:18]}-{tail}"

    def _base_index(self, group_id: str) -> int | None:
        try:
            index = int(group_id.rsplit("-", 1)[1], 16) ^ self._mask
        except (IndexError, ValueError):
            return None
        if 0 <= index < self.spec.groups and self._base_group_id(index) == group_id:
            return index
        return None

    def base_group(self, index: int, group_id: str | None = None) -> dict[str, Any]:
        """Group ``index`` as generated, in Graph's full form.

        Derived from one digest rather than a seeded ``random.Random``, with the per-department
        strings made once: the xlarge tenant generates 200,000 of these per full read, and the
        simulator shares the benchmark machine with the sync it serves."""
        d = hashlib.blake2b(f"g|{self.seed}|{index}".encode(), digest_size=16).digest()
        names = _GROUP_NAMES[d[1] % len(_DEPARTMENTS)][d[2] % len(_ROLES)]
        nickname = f"{names.nickname}-{index}"
        created = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(_EPOCH_TS - 60 * (index * 7 + d[3] % 7))
        )
        kind = d[0] / 256
        unified = kind < 0.2
        dynamic = not unified and kind < 0.4
        mail = f"{nickname}@contoso.onmicrosoft.com" if unified else None
        return {
            "@odata.type": _GROUP_TYPE,
            "id": group_id or self._base_group_id(index),
            "deletedDateTime": None,
            "classification": None,
            "createdDateTime": created,
            "creationOptions": [],
            "description": None if d[4] & 1 else names.description,
            "displayName": names.unified
            if unified
            else f"{'DYN' if dynamic else 'SG'}-{names.display}-{index:05d}",
            "groupTypes": ["Unified"] if unified else ["DynamicMembership"] if dynamic else [],
            "isAssignableToRole": None,
            "mail": mail,
            "mailEnabled": unified,
            "mailNickname": nickname,
            "membershipRule": f'(device.deviceOSType -eq "{("Windows", "iOS")[d[13] & 1]}")'
            if dynamic
            else None,
            "membershipRuleProcessingState": "On" if dynamic else None,
            "onPremisesSyncEnabled": None,
            "proxyAddresses": [f"SMTP:{mail}"] if unified else [],
            "renewedDateTime": created,
            "securityEnabled": not unified,
            "securityIdentifier": f"S-1-12-1-{int.from_bytes(d[5:9]) >> 1}-{int.from_bytes(d[9:13]) >> 1}",
            "visibility": "Private" if unified else None,
        }

    def group_members(self, group_id: str) -> list[dict[str, Any]]:
        """The group's members (users), generated from its id."""
        r = random.Random(group_id)
        return [
            {"@odata.type": "#microsoft.graph.user", "id": str(uuid.UUID(int=r.getrandbits(128)))}
            for _ in range(r.choice((0, 1, 2, 3, 5, 8, 12)))
        ]

    def group_by_id(self, group_id: str) -> dict[str, Any] | None:
        """A current (not deleted) group in its full form, or None."""
        with self.lock:
            if group_id in self._deleted_groups:
                return None
            return self._group_state(group_id)

    def _group_state(self, group_id: str) -> dict[str, Any] | None:
        if group_id in self._added_groups:
            return self._added_groups[group_id]
        if group_id in self._group_edits:
            return self._group_edits[group_id]
        index = self._base_index(group_id)
        return None if index is None else self.base_group(index)

    def deletion_reason(self, group_id: str) -> str | None:
        """``changed`` for a soft-deleted group (restorable), ``deleted`` when permanent."""
        return self._deleted_groups.get(group_id)

    def group_at(self, position: int) -> tuple[str, dict[str, Any] | None]:
        """The group at an enumeration position (base groups, then added ones): its id and
        current form, None when deleted."""
        with self.lock:
            if position < self.spec.groups:
                group_id = self._base_group_id(position)
            else:
                group_id = self._added_order[position - self.spec.groups]
            if group_id in self._deleted_groups:
                return group_id, None
            state = self._group_edits.get(group_id) or self._added_groups.get(group_id)
            return group_id, state if state is not None else self.base_group(position, group_id)

    @property
    def group_positions(self) -> int:
        with self.lock:
            return self.spec.groups + len(self._added_order)

    def groups(self) -> Iterator[dict[str, Any]]:
        """Current groups, as the ``groups_delta`` contract selects them (generated lazily)."""
        how = contract_shape(CONTRACTS["groups_delta"].select, ())
        for position in range(self.group_positions):
            _, group = self.group_at(position)
            if group is not None:
                yield shape(group, how)

    def add_group(self, display_name: str | None = None, **fields: Any) -> dict[str, Any]:
        with self.lock:
            group_id = p.guid(self._ids)
            nickname = f"new-group-{len(self._added_order)}"
            created = self._tick()[:19] + "Z"
            group = self.base_group(0) | {
                "id": group_id,
                "displayName": display_name or f"SG-New-{len(self._added_order):04d}",
                "description": None,
                "mailNickname": nickname,
                "groupTypes": [],
                "mail": None,
                "mailEnabled": False,
                "securityEnabled": True,
                "membershipRule": None,
                "membershipRuleProcessingState": None,
                "proxyAddresses": [],
                "createdDateTime": created,
                "renewedDateTime": created,
                "securityIdentifier": f"S-1-12-1-{int(group_id[:8], 16)}-{int(group_id[9:13], 16)}",
                **fields,
            }
            self._added_groups[group_id] = group
            self._added_order.append(group_id)
            self._log_group_change(group_id)
            return copy.deepcopy(group)

    def update_group(self, group_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            current = self.group_by_id(group_id)
            if current is None:
                raise KeyError(f"no group {group_id}")
            updated = {**current, **changes, "id": group_id}
            if group_id in self._added_groups:
                self._added_groups[group_id] = updated
            else:
                self._group_edits[group_id] = updated
            self._log_group_change(group_id)
            return copy.deepcopy(updated)

    def delete_group(self, group_id: str, *, permanent: bool = False) -> None:
        with self.lock:
            if self.group_by_id(group_id) is None:
                raise KeyError(f"no group {group_id}")
            self._deleted_groups[group_id] = "deleted" if permanent else "changed"
            self._group_edits.pop(group_id, None)
            self._log_group_change(group_id)

    def random_group_id(self, rng: random.Random) -> str:
        """A current group, drawn without enumerating the directory."""
        with self.lock:
            for _ in range(1000):
                position = rng.randrange(self.group_positions)
                group_id, group = self.group_at(position)
                if group is not None:
                    return group_id
        raise LookupError("the tenant has no groups")

    # --- policies ----------------------------------------------------------------------------

    def _store(self, contract_key: str) -> dict[str, dict[str, Any]]:
        with self.lock:
            store = self._policies.get(contract_key)
            if store is None:
                if contract_key not in POLICY_CONTRACTS and contract_key not in DIRECTORY_OBJECTS:
                    raise KeyError(f"{contract_key} is not a policy contract")
                store = self._policies[contract_key] = {}
                for obj in self._generate(contract_key):
                    store[obj["id"]] = obj
            return store

    def _ctx(self, rng: random.Random) -> p.Ctx:
        return p.Ctx(
            rng=rng,
            tenant_prefix=_derive_guid("enrollment", self.seed),
            pick_group=self.random_group_id,
            filter_ids=lambda: list(self._store("assignment_filters")),
            policy_ids=lambda key: list(self._store(key)),
        )

    def _generate(self, key: str) -> list[dict[str, Any]]:
        if key in DIRECTORY_OBJECTS:
            return []
        rng = random.Random(f"{self.profile}|{self.seed}|{key}")
        ctx = self._ctx(rng)
        count = rng.randint(*self.spec.per_type)
        objs: list[dict[str, Any]]
        if key == "enrollment_configurations":
            objs = p.enrollment_builtins(ctx)
            objs += [p.enrollment_configuration(ctx, n + 1) for n in range(count)]
        elif key == "scope_tags":
            objs = [p.scope_tag(ctx, n) for n in range(count)]
        elif key == "role_definitions":
            objs = [p.role_definition(ctx, name) for name in p.BUILTIN_ROLES]
            objs += [p.role_definition(ctx, None) for _ in range(count)]
        elif key == "device_health_scripts":
            objs = [p.device_health_script(ctx, n == 0) for n in range(count)]
        elif key == "settings_catalog":
            objs = []
            for n in range(count):
                low, high = self.spec.settings
                if self.spec.big_settings and n % 10 == 0:
                    low, high = self.spec.big_settings, self.spec.big_settings + 20
                objs.append(p.settings_catalog(ctx, (low, high)))
        else:
            objs = [self._new_object(ctx, key) for _ in range(count)]
        for obj in objs:
            if p.supports_assignments(key) and "assignments" not in obj:
                obj["assignments"] = p.make_assignments(ctx, key, obj["id"])
        return objs

    def _new_object(self, ctx: p.Ctx, key: str) -> dict[str, Any]:
        factories = {
            "device_configurations": p.device_configuration,
            "compliance_policies": p.compliance_policy,
            "settings_catalog": lambda c: p.settings_catalog(c, self.spec.settings),
            "group_policy_configurations": p.group_policy_configuration,
            "endpoint_security_intents": p.endpoint_security_intent,
            "autopilot_profiles": p.autopilot_profile,
            "enrollment_configurations": lambda c: p.enrollment_configuration(
                c, len(self._policies.get(key, {})) + 1
            ),
            "app_protection_ios": lambda c: p.app_protection(c, "ios"),
            "app_protection_android": lambda c: p.app_protection(c, "android"),
            "app_protection_windows": lambda c: p.app_protection(c, "windows"),
            "app_protection_mdm_wip": p.mdm_wip,
            "managed_app_configurations": p.managed_app_configuration,
            "mobile_app_configurations": p.mobile_app_configuration,
            "conditional_access_policies": p.conditional_access_policy,
            "assignment_filters": p.assignment_filter,
            "scope_tags": lambda c: p.scope_tag(c, 1 + max(map(int, self._store(key)), default=0)),
            "role_definitions": lambda c: p.role_definition(c, None),
            "notification_templates": p.notification_template,
            "device_categories": p.device_category,
            "policy_sets": p.policy_set,
            "powershell_scripts": p.powershell_script,
            "macos_shell_scripts": p.macos_shell_script,
            "device_health_scripts": lambda c: p.device_health_script(c, False),
            "compliance_scripts": p.compliance_script,
            "feature_update_profiles": p.feature_update_profile,
            "quality_update_profiles": p.quality_update_profile,
            "driver_update_profiles": p.driver_update_profile,
        }
        return factories[key](ctx)

    def stored_policies(self, contract_key: str) -> list[dict[str, Any]]:
        """The stored objects (full form, navigation inline), for the server to shape."""
        with self.lock:
            return list(self._store(contract_key).values())

    def stored_policy(self, contract_key: str, policy_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self._store(contract_key).get(policy_id)

    def policies(self, contract_key: str) -> list[dict[str, Any]]:
        """Current objects of a policy contract as a GraphClient assembles them: the listed
        form plus every detail and assignment it reads per item."""
        contract = CONTRACTS[contract_key]
        with self.lock:
            return [
                copy.deepcopy(full_form(contract, o)) for o in self.stored_policies(contract_key)
            ]

    def add_policy(self, contract_key: str, obj: dict[str, Any] | None = None) -> dict[str, Any]:
        with self.lock:
            store = self._store(contract_key)
            if obj is None:
                ctx = self._ctx(self._ids)
                obj = self._new_object(ctx, contract_key)
                if p.supports_assignments(contract_key):
                    obj["assignments"] = p.make_assignments(ctx, contract_key, obj["id"])
            obj = copy.deepcopy(obj)
            obj.setdefault("id", p.guid(self._ids))
            self._touch(CONTRACTS[contract_key], obj)
            store[obj["id"]] = obj
            return copy.deepcopy(obj)

    def update_policy(self, contract_key: str, policy_id: str, changes: dict[str, Any]) -> dict:
        with self.lock:
            store = self._store(contract_key)
            if policy_id not in store:
                raise KeyError(f"no {contract_key} object {policy_id}")
            obj = {**store[policy_id], **copy.deepcopy(changes), "id": policy_id}
            if "settings" in changes and "settingCount" in obj:
                obj["settingCount"] = len(obj["settings"])
            self._touch(CONTRACTS[contract_key], obj)
            store[policy_id] = obj
            return copy.deepcopy(obj)

    def delete_policy(self, contract_key: str, policy_id: str) -> None:
        with self.lock:
            if self._store(contract_key).pop(policy_id, None) is None:
                raise KeyError(f"no {contract_key} object {policy_id}")

    # --- what Graph's writes need -------------------------------------------------------------

    def new_policy_id(self, contract_key: str) -> str:
        """The id Graph gives a new object: scope tags are numbered, other objects get GUIDs."""
        with self.lock:
            ids = list(self._store(contract_key))
            if ids and all(i.isdigit() for i in ids):
                return str(1 + max(map(int, ids)))
            return p.guid(self._ids)

    def new_element_id(self) -> str:
        with self.lock:
            return p.guid(self._ids)

    def now_stamp(self) -> str:
        with self.lock:
            return self._tick()

    def store_policy(self, contract_key: str, obj: dict[str, Any]) -> None:
        """Keep ``obj`` as given: whoever wrote it set its id and stamps."""
        with self.lock:
            self._store(contract_key)[obj["id"]] = copy.deepcopy(obj)

    def set_assignments(
        self, contract_key: str, policy_id: str, assignments: list[dict[str, Any]]
    ) -> None:
        if not p.supports_assignments(contract_key):
            raise ValueError(f"{contract_key} objects carry no assignments")
        self.update_policy(contract_key, policy_id, {"assignments": assignments})

    def _touch(self, contract: Contract, obj: dict[str, Any]) -> None:
        if contract.modified_field and contract.modified_field in obj:
            obj[contract.modified_field] = self._tick()
        if isinstance(obj.get("version"), int):
            obj["version"] += 1

    # --- random change -----------------------------------------------------------------------

    def mutate(self, rng: random.Random, n: int = 10) -> list[str]:
        """``n`` random changes to policies, assignments and groups; what changed, in words."""
        done = []
        with self.lock:
            for _ in range(n):
                done.append(self._mutate_once(rng))
        return done

    def _mutate_once(self, rng: random.Random) -> str:
        action = rng.choice(
            ("add_policy", "edit_policy", "delete_policy", "assign", "add_group", "edit_group",
             "delete_group", "purge_group")
        )  # fmt: skip
        key = rng.choice(POLICY_CONTRACTS)
        contract = CONTRACTS[key]
        candidates = [o for o in self.stored_policies(key) if not is_builtin(contract, o)]
        if action == "add_policy" or (
            action in ("edit_policy", "delete_policy") and not candidates
        ):
            ctx = self._ctx(rng)
            obj = self._new_object(ctx, key)
            if p.supports_assignments(key):
                obj["assignments"] = p.make_assignments(ctx, key, obj["id"])
            added = self.add_policy(key, obj)
            return f"added {key} {added['id']} {added.get(contract.name_field)!r}"
        if action == "edit_policy":
            obj = rng.choice(candidates)
            name = f"{obj.get(contract.name_field) or 'policy'} (edited {self._seq}-{rng.randrange(10**6)})"
            self.update_policy(key, obj["id"], {contract.name_field: name})
            return f"renamed {key} {obj['id']} to {name!r}"
        if action == "delete_policy":
            obj = rng.choice(candidates)
            self.delete_policy(key, obj["id"])
            return f"deleted {key} {obj['id']}"
        if action == "assign":
            assignable = [k for k in POLICY_CONTRACTS if p.supports_assignments(k)]
            key = rng.choice(assignable)
            objs = self.stored_policies(key)
            if not objs:
                return self._mutate_once(rng)
            obj = rng.choice(objs)
            current = list(obj.get("assignments") or [])
            if current and rng.random() < 0.4:
                current.pop(rng.randrange(len(current)))
                verb = "removed an assignment from"
            else:
                target = p.make_target(self._ctx(rng), key, "group")
                current = [a for a in current if a["target"].get("groupId") != target["groupId"]]
                current.append(p.make_assignment(key, obj["id"], target))
                verb = "assigned a group to"
            self.set_assignments(key, obj["id"], current)
            return f"{verb} {key} {obj['id']}"
        if action == "add_group":
            group = self.add_group()
            return f"added group {group['id']} {group['displayName']!r}"
        group_id = self.random_group_id(rng)
        if action == "edit_group":
            name = f"SG-Renamed-{self._seq}-{rng.randrange(10**6)}"
            self.update_group(group_id, {"displayName": name, "description": "renamed"})
            return f"renamed group {group_id} to {name!r}"
        self.delete_group(group_id, permanent=action == "purge_group")
        return f"{'purged' if action == 'purge_group' else 'deleted'} group {group_id}"


def full_form(contract: Contract, stored: dict[str, Any]) -> dict[str, Any]:
    """What a GraphClient holds for one object after ``read_policies``: the listed shape, each
    collection detail and per-item assignments under their keys, merged item reads."""
    obj = shape(stored, contract_shape(contract.select, contract.expand))
    for read in contract.per_item_reads:
        detail = CONTRACTS[read.contract]
        how = contract_shape(detail.select, detail.expand)
        if read.mode == "merge":
            obj.update(shape(stored, how, item_read=True))
        else:
            nav = detail.path.rsplit("/", 1)[1]
            obj[read.key] = [shape(v, how) for v in stored.get(nav) or []]
    return obj
