"""The restore's rules, pure (DESIGN §9): what an object's restorable view holds, which writes an
item takes (as Graph writes each type), conditional access held in report-only, and reference
mapping that blocks rather than guesses."""

from __future__ import annotations

import copy
from typing import Any

from atlas_dagster.restore import rules
from graph_contracts import CONTRACTS

GRAPH = "https://graph.microsoft.com"
SC = CONTRACTS["settings_catalog"]


def _setting(definition: str, value: str) -> dict[str, Any]:
    return {
        "id": "0",
        "settingInstance": {
            "@odata.type": "#microsoft.graph.deviceManagementConfigurationSimpleSettingInstance",
            "settingDefinitionId": definition,
            "simpleSettingValue": {
                "@odata.type": "#microsoft.graph.deviceManagementConfigurationStringSettingValue",
                "value": value,
            },
        },
        "settingDefinitions": [{"id": definition, "displayName": "expanded by Graph"}],
    }


def _catalog_policy(**changes: Any) -> dict[str, Any]:
    obj = {
        "@odata.type": "#microsoft.graph.deviceManagementConfigurationPolicy",
        "id": "p1",
        "name": "WIN - Baseline",
        "description": "",
        "platforms": "windows10",
        "technologies": "mdm",
        "roleScopeTagIds": ["0"],
        "createdDateTime": "2026-01-01T00:00:00Z",
        "lastModifiedDateTime": "2026-02-01T00:00:00Z",
        "settingCount": 2,
        "settings": [_setting("a", "1"), _setting("b", "2")],
        "assignments": [
            {
                "id": "p1_g1",
                "source": "direct",
                "sourceId": "p1",
                "target": {
                    "@odata.type": "#microsoft.graph.groupAssignmentTarget",
                    "groupId": "g1",
                },
            },
            {
                "id": "p1_g2",
                "source": "policySets",
                "sourceId": "set1",
                "target": {
                    "@odata.type": "#microsoft.graph.groupAssignmentTarget",
                    "groupId": "g2",
                },
            },
        ],
    }
    obj.update(changes)
    return obj


def _writes(contract, backed_up, live) -> list[str]:
    wanted = rules.view(contract, backed_up)
    current = rules.view(contract, live) if live is not None else None
    planned = rules.plan_writes(
        contract, wanted, current, live, graph_base=GRAPH, source_obj=backed_up
    )
    return [w.contract_key for w in planned.writes]


def test_a_view_leaves_out_what_graph_sets_and_assignments_a_policy_set_gives():
    viewed = rules.view(SC, _catalog_policy())
    assert "id" not in viewed and "lastModifiedDateTime" not in viewed
    assert "settingCount" not in viewed
    assert all("id" not in s and "settingDefinitions" not in s for s in viewed["settings"])
    assert [a["target"]["groupId"] for a in viewed["assignments"]] == ["g1"]
    assert all("id" not in a and "source" not in a for a in viewed["assignments"])
    # Read twice, an object whose Graph-set fields moved on is the same object to a restore.
    later = _catalog_policy(lastModifiedDateTime="2026-03-01T00:00:00Z", settingCount=9)
    assert rules.view_hash(SC, later) == rules.view_hash(SC, _catalog_policy())


def test_a_rename_is_a_patch_and_a_changed_setting_is_one_put_of_the_whole_policy():
    backed_up = _catalog_policy()
    assert _writes(SC, backed_up, _catalog_policy(name="renamed")) == ["settings_catalog.update"]
    edited = _catalog_policy(settings=[_setting("a", "changed"), _setting("b", "2")])
    assert _writes(SC, backed_up, edited) == ["settings_catalog.replace"]
    both = _catalog_policy(name="renamed", settings=[_setting("a", "1")])
    assert _writes(SC, backed_up, both) == ["settings_catalog.replace"]
    moved = copy.deepcopy(backed_up)
    moved["assignments"][0]["target"]["groupId"] = "g9"
    assert _writes(SC, backed_up, moved) == ["settings_catalog.assign"]
    assert _writes(SC, backed_up, backed_up) == []


def test_a_put_carries_settings_without_graphs_ids_and_expansions():
    wanted = rules.view(SC, _catalog_policy())
    current = rules.view(SC, _catalog_policy(settings=[_setting("a", "1")]))
    [put] = rules.plan_writes(
        SC, wanted, current, _catalog_policy(), graph_base=GRAPH, source_obj=_catalog_policy()
    ).writes
    assert put.body["name"] == "WIN - Baseline"
    assert [s["settingInstance"]["settingDefinitionId"] for s in put.body["settings"]] == ["a", "b"]
    assert all(set(s) == {"settingInstance"} for s in put.body["settings"])


def test_a_patch_clears_a_field_the_backup_leaves_empty():
    backed_up = _catalog_policy(description=None)
    live = _catalog_policy(description="added in the portal")
    wanted, current = rules.view(SC, backed_up), rules.view(SC, live)
    [patch] = rules.plan_writes(
        SC, wanted, current, live, graph_base=GRAPH, source_obj=backed_up
    ).writes
    assert patch.contract_key == "settings_catalog.update"
    assert patch.body["description"] is None


def test_a_compliance_policy_is_created_with_its_scheduled_actions_then_assigned():
    contract = CONTRACTS["compliance_policies"]
    backed_up = {
        "@odata.type": "#microsoft.graph.windows10CompliancePolicy",
        "id": "c1",
        "displayName": "WIN - Compliance",
        "passwordRequired": True,
        "scheduledActionsForRule": [
            {
                "id": "r1",
                "ruleName": "PasswordRequired",
                "scheduledActionConfigurations": [
                    {"id": "x", "actionType": "block", "gracePeriodHours": 0}
                ],
            }
        ],
        "assignments": [
            {
                "id": "c1_g1",
                "target": {
                    "@odata.type": "#microsoft.graph.groupAssignmentTarget",
                    "groupId": "g1",
                },
            }
        ],
    }
    wanted = rules.view(contract, backed_up)
    planned = rules.plan_writes(
        contract, wanted, None, None, graph_base=GRAPH, source_obj=backed_up
    ).writes
    assert [w.contract_key for w in planned] == [
        "compliance_policies.create",
        "compliance_policies.assign",
    ]
    actions = planned[0].body["scheduledActionsForRule"]
    assert actions == [
        {
            "ruleName": "PasswordRequired",
            "scheduledActionConfigurations": [{"actionType": "block", "gracePeriodHours": 0}],
        }
    ]
    assert planned[1].body == {
        "assignments": [
            {"target": {"@odata.type": "#microsoft.graph.groupAssignmentTarget", "groupId": "g1"}}
        ]
    }


def test_admx_values_are_written_as_a_delta_bound_by_definition_and_presentation():
    contract = CONTRACTS["group_policy_configurations"]

    def value(definition: str, enabled: bool, text: str, value_id: str) -> dict[str, Any]:
        return {
            "id": value_id,
            "enabled": enabled,
            "definition": {"id": definition, "displayName": "setting"},
            "presentationValues": [
                {
                    "@odata.type": "#microsoft.graph.groupPolicyPresentationValueText",
                    "id": f"{value_id}-p",
                    "value": text,
                    "presentation": {"id": f"{definition}-pres", "label": "Text"},
                }
            ],
        }

    base = {
        "@odata.type": "#microsoft.graph.groupPolicyConfiguration",
        "id": "a1",
        "displayName": "WIN - ADMX",
        "assignments": [],
    }
    backed_up = {
        **base,
        "definitionValues": [value("d1", True, "x", "v1"), value("d2", True, "y", "v2")],
    }
    live = {
        **base,
        "definitionValues": [value("d1", False, "x", "L1"), value("d3", True, "z", "L3")],
    }
    wanted, current = rules.view(contract, backed_up), rules.view(contract, live)
    [delta] = rules.plan_writes(
        contract, wanted, current, live, graph_base=GRAPH, source_obj=backed_up
    ).writes
    assert delta.contract_key == "group_policy_configurations.updateDefinitionValues"
    root = f"{GRAPH}/beta/deviceManagement/groupPolicyDefinitions"
    [added] = delta.body["added"]
    assert added["definition@odata.bind"] == f"{root}('d2')"
    assert added["presentationValues"][0]["presentation@odata.bind"] == (
        f"{root}('d2')/presentations('d2-pres')"
    )
    [updated] = delta.body["updated"]
    assert (updated["id"], updated["enabled"]) == ("L1", True)  # the target's own value, changed
    assert delta.body["deletedIds"] == ["L3"]


def test_conditional_access_is_never_raised_to_enforcement_by_a_restore():
    policy = {"displayName": "CA - MFA", "state": "enabled"}
    created = dict(policy)
    assert "report-only" in (rules.hold_ca_state(created, None, keep_state=False) or "")
    assert created["state"] == rules.CA_REPORT_ONLY
    disabled = dict(policy)
    rules.hold_ca_state(disabled, {"state": "disabled"}, keep_state=False)
    assert disabled["state"] == rules.CA_REPORT_ONLY
    # An enabled policy stays enabled; --keep-ca-state writes the backed-up state.
    for target, keep in (({"state": "enabled"}, False), ({"state": "disabled"}, True)):
        kept = dict(policy)
        assert rules.hold_ca_state(kept, target, keep_state=keep) is None
        assert kept["state"] == "enabled"
    off = {"displayName": "CA - Legacy", "state": "disabled"}
    assert rules.hold_ca_state(off, {"state": "enabled"}, keep_state=False) is None
    assert off["state"] == "disabled"


def test_references_map_to_the_target_or_block_the_item():
    refs = rules.References(
        same_tenant=False,
        groups={"g1": "t1"},
        filters={"f1": rules.placeholder("assignment_filters", "f1")},
        scope_tags={"0": "0"},
        why_not={"g2": "2 groups in the target are named 'Pilot': never a guess"},
    )
    obj = _catalog_policy()
    obj["assignments"][0]["target"]["deviceAndAppManagementAssignmentFilterId"] = "f1"
    mapped = rules.map_references(SC, obj, refs)
    target = mapped.obj["assignments"][0]["target"]
    assert target["groupId"] == "t1"
    assert target["deviceAndAppManagementAssignmentFilterId"].startswith(rules.REF_PREFIX)
    assert obj["assignments"][0]["target"]["groupId"] == "g1", "the backed-up object is not changed"
    # The policy set's assignment (group g2) is not the policy's to write: nothing to map.
    assert mapped.problems == []
    obj["assignments"][0]["target"]["groupId"] = "g2"
    blocked = rules.map_references(SC, obj, refs)
    assert (
        "restore_group_unmapped",
        "2 groups in the target are named 'Pilot': never a guess",
    ) in (blocked.problems)
    ca = {"conditions": {"users": {"includeUsers": ["u-1"], "includeGroups": ["g1"]}}}
    mapped_ca = rules.map_references(CONTRACTS["conditional_access_policies"], ca, refs)
    assert mapped_ca.obj["conditions"]["users"]["includeGroups"] == ["t1"]
    assert [r for r, _ in mapped_ca.problems] == ["restore_reference_unmapped"]
    resolved, missing = rules.resolve_placeholders(
        mapped.obj, {rules.placeholder("assignment_filters", "f1"): "new-filter"}
    )
    assert resolved["assignments"][0]["target"]["deviceAndAppManagementAssignmentFilterId"] == (
        "new-filter"
    )
    assert missing == []


def test_users_and_named_locations_of_a_ca_policy_are_mapped_or_block_it():
    ca_contract = CONTRACTS["conditional_access_policies"]
    refs = rules.References(
        same_tenant=False,
        users={"u-admin": "target-admin"},
        locations={"loc-hq": "target-hq"},
        why_not={"loc-lab": "no named location named 'Lab' in the target"},
    )
    ca = {
        "conditions": {
            "users": {
                "includeUsers": ["All"],
                "excludeUsers": ["u-admin", "GuestsOrExternalUsers"],
            },
            "locations": {
                "includeLocations": ["All"],
                "excludeLocations": ["AllTrusted", "loc-hq"],
            },
        }
    }
    assert rules.ca_references(ca, "user") == {"u-admin"}
    assert rules.ca_references(ca, "named location") == {"loc-hq"}
    mapped = rules.map_references(ca_contract, ca, refs)
    assert mapped.obj["conditions"]["users"]["excludeUsers"] == [
        "target-admin",
        "GuestsOrExternalUsers",
    ]
    assert mapped.obj["conditions"]["locations"]["excludeLocations"] == ["AllTrusted", "target-hq"]
    assert ca["conditions"]["locations"]["excludeLocations"][1] == "loc-hq", "backup unchanged"
    assert mapped.problems == []
    ca["conditions"]["locations"]["excludeLocations"].append("loc-lab")
    ca["conditions"]["users"]["excludeUsers"].append("u-gone")
    blocked = rules.map_references(ca_contract, ca, refs)
    assert blocked.problems == [
        ("restore_reference_unmapped", "user u-gone has no match in the target"),
        ("restore_reference_unmapped", "no named location named 'Lab' in the target"),
    ]
    # A policy without locations (Graph returns null) names none.
    assert rules.ca_references({"conditions": {"locations": None}}, "named location") == set()
