"""Changes an admin makes in the Intune portal between a backup and a restore: the restore
acceptance scenario (DESIGN §9), shared by the tests and ``bench/restore.py``.

``prepare`` gives the tenant what the scenario needs before the backup (a custom profile with an
encrypted OMA value, a remediation with a run schedule); ``edit`` then makes 25 changes: ten
deletions of mixed types, ten edits (a rename among them) and five assignment changes."""

from __future__ import annotations

import copy
import json
from typing import Any

from atlas_dagster.simulator import payloads as p
from atlas_dagster.simulator.tenant import SimulatedTenant

ENCRYPTED_PROFILE = "WIN - Custom - Encrypted Wi-Fi key"


def encrypted_profile() -> dict[str, Any]:
    # A custom profile whose OMA value Graph returns masked (isEncrypted).
    return {
        "@odata.type": "#microsoft.graph.windows10CustomConfiguration",
        "displayName": ENCRYPTED_PROFILE,
        "description": "",
        "roleScopeTagIds": ["0"],
        "omaSettings": [
            {
                "@odata.type": "#microsoft.graph.omaSettingString",
                "displayName": "Wi-Fi key",
                "omaUri": "./Vendor/MSFT/WiFi/Profile/Corp/WlanXml",
                "isEncrypted": True,
                "secretReferenceValueId": "5b0e2f4a-1111-4c3b-9d7e-000000000001",
                "value": "****",
            },
            {
                "@odata.type": "#microsoft.graph.omaSettingString",
                "displayName": "Plain",
                "omaUri": "./Device/Vendor/MSFT/Policy/Config/Custom/Plain",
                "isEncrypted": False,
                "value": "1",
            },
        ],
        "assignments": [],
    }


def _stored(tenant: SimulatedTenant, key: str) -> list[dict[str, Any]]:
    return [
        o
        for o in tenant.stored_policies(key)
        if not o.get("isBuiltIn") and not o.get("isGlobalScript")
    ]


def edit(tenant: SimulatedTenant) -> dict[tuple[str, str], str]:
    """25 changes an admin makes in the portal after the backup: what each did, by the
    backed-up object it changed."""
    done: dict[tuple[str, str], str] = {}

    def pick(key: str, n: int, test=lambda o: True) -> dict[str, Any]:
        candidates = [o for o in _stored(tenant, key) if (key, o["id"]) not in done and test(o)]
        return copy.deepcopy(candidates[n])

    def change(key: str, obj: dict[str, Any], what: str, **changes: Any) -> None:
        tenant.update_policy(key, obj["id"], changes)
        done[(key, obj["id"])] = what

    # Ten deletions of mixed types.
    deprecated = {t for t, v in p.TEMPLATES.items() if v.get("isDeprecated")}
    for key, test in (
        ("settings_catalog", lambda o: True),
        ("group_policy_configurations", lambda o: True),
        ("compliance_policies", lambda o: True),
        ("conditional_access_policies", lambda o: o.get("state") == "enabled"),
        ("powershell_scripts", lambda o: True),
        ("app_protection_ios", lambda o: True),
        ("endpoint_security_intents", lambda o: o.get("templateId") not in deprecated),
        ("device_configurations", lambda o: o.get("displayName") == ENCRYPTED_PROFILE),
        ("notification_templates", lambda o: True),
        ("mobile_app_configurations", lambda o: True),
    ):
        obj = pick(key, 0, test)
        tenant.delete_policy(key, obj["id"])
        done[(key, obj["id"])] = "deleted"
    # Ten edits.
    obj = pick("device_configurations", 0, lambda o: "omaSettings" not in o)
    change("device_configurations", obj, "displayName", displayName=obj["displayName"] + " (old)")
    obj = pick("settings_catalog", 0, lambda o: len(o["settings"]) >= 2)
    settings = copy.deepcopy(obj["settings"])
    instance = settings[0]["settingInstance"]
    instance["choiceSettingValue" if "choiceSettingValue" in instance else "simpleSettingValue"] = {
        "@odata.type": "#microsoft.graph.deviceManagementConfigurationStringSettingValue",
        "value": "changed in the portal",
    }
    change("settings_catalog", obj, "settings", settings=settings)
    obj = pick("settings_catalog", 0, lambda o: len(o["settings"]) >= 2)
    change("settings_catalog", obj, "settings", settings=obj["settings"][1:])
    obj = pick("group_policy_configurations", 0, lambda o: len(o["definitionValues"]) >= 1)
    values = copy.deepcopy(obj["definitionValues"])
    values[0]["enabled"] = not values[0]["enabled"]
    change("group_policy_configurations", obj, "definitionValues", definitionValues=values)
    obj = pick("conditional_access_policies", 0, lambda o: o.get("state") == "enabled")
    change("conditional_access_policies", obj, "state", state="disabled")
    obj = pick("powershell_scripts", 0)
    change("powershell_scripts", obj, "scriptContent", scriptContent="V3JpdGUtSG9zdCAiZWRpdGVkIg==")
    obj = pick("compliance_policies", 0)
    change("compliance_policies", obj, "description", description="edited in the portal")
    obj = pick("app_protection_android", 0)
    change("app_protection_android", obj, "pinRequired", pinRequired=not obj.get("pinRequired"))
    # An intent of a deprecated template can still be edited (and so restored in place).
    obj = pick("endpoint_security_intents", 0)
    settings = copy.deepcopy(obj["settings"])
    settings[0]["value"] = not settings[0]["value"]
    settings[0]["valueJson"] = json.dumps(settings[0]["value"])
    change("endpoint_security_intents", obj, "settings", settings=settings)
    obj = pick("assignment_filters", 0)
    change("assignment_filters", obj, "rule", rule='(device.osVersion -startsWith "11")')
    # Five assignment changes.
    groups = [g["id"] for g in list(tenant.groups())[:40]]

    def assignments(key: str, n: int, test) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        obj = pick(key, n, test)
        return obj, copy.deepcopy(obj["assignments"])

    obj, current = assignments("compliance_policies", 0, lambda o: len(o["assignments"]) >= 2)
    change("compliance_policies", obj, "assignments", assignments=current[1:])
    obj, current = assignments("device_configurations", 0, lambda o: "omaSettings" not in o)
    used = {(a["target"].get("groupId")) for a in current}
    new_group = next(g for g in groups if g not in used)
    target = {"@odata.type": "#microsoft.graph.groupAssignmentTarget", "groupId": new_group}
    current.append(p.make_assignment("device_configurations", obj["id"], target))
    change("device_configurations", obj, "assignments", assignments=current)
    obj, current = assignments(
        "app_protection_windows",
        0,
        lambda o: any(a["target"].get("groupId") for a in o["assignments"]),
    )
    moved = next(a for a in current if a["target"].get("groupId"))
    used = {a["target"].get("groupId") for a in current}
    moved["target"]["groupId"] = next(g for g in groups if g not in used)
    change("app_protection_windows", obj, "assignments", assignments=current)
    obj, current = assignments("app_protection_mdm_wip", 0, lambda o: len(o["assignments"]) >= 1)
    change("app_protection_mdm_wip", obj, "assignments", assignments=[])
    obj, current = assignments(
        "device_health_scripts", 0, lambda o: any("runSchedule" in a for a in o["assignments"])
    )
    current[0]["runSchedule"] = {
        "@odata.type": "#microsoft.graph.deviceHealthScriptDailySchedule",
        "interval": 2,
        "time": "11:00:00.0000000",
        "useUtc": True,
    }
    change("device_health_scripts", obj, "assignments", assignments=current)
    return done


def prepare(tenant: SimulatedTenant) -> None:
    tenant.add_policy("device_configurations", encrypted_profile())
    script = _stored(tenant, "device_health_scripts")[0]
    current = copy.deepcopy(script["assignments"]) or [
        p.make_assignment(
            "device_health_scripts",
            script["id"],
            {
                "@odata.type": "#microsoft.graph.groupAssignmentTarget",
                "groupId": next(tenant.groups())["id"],
            },
        )
    ]
    current[0]["runSchedule"] = {
        "@odata.type": "#microsoft.graph.deviceHealthScriptDailySchedule",
        "interval": 1,
        "time": "09:00:00.0000000",
        "useUtc": False,
    }
    tenant.set_assignments("device_health_scripts", script["id"], current)
