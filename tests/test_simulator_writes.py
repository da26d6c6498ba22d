"""The simulator writes as Graph does: server-set ids and stamps, 201/200/204 as each write
answers, assign actions that replace a whole set, 403 without the ReadWrite role, writes in
``$batch`` ordered by ``dependsOn``, Intune's write throttling, and a create whose response is
lost after it was applied. The client side is plain httpx over the simulator's transport."""

from __future__ import annotations

import json

import httpx
import pytest

from atlas_dagster.config import ProviderConnection, Secret
from atlas_dagster.graph import GraphClient, TokenBucket
from atlas_dagster.simulator import GraphSimulator, SimulatedTenant
from atlas_dagster.simulator.payloads import ADMX_DEFINITIONS, TEMPLATES, admx_presentation
from atlas_dagster.simulator.writes import WriteLimits
from graph_contracts import CONTRACTS, all_permissions, stable_payload, write_permissions
from tests.test_simulator import SECRET, Graph

DM = "/beta/deviceManagement"
ALL_ROLES = [*all_permissions(), *write_permissions()]


class Writer(Graph):
    def send(self, method: str, path: str, body: object = None) -> httpx.Response:
        return self.http.request(
            method,
            self.base + path,
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        )


@pytest.fixture
def sim() -> GraphSimulator:
    return GraphSimulator(
        SimulatedTenant.generate("small", 7), client_secret=SECRET, granted_roles=ALL_ROLES
    )


@pytest.fixture
def graph(sim) -> Writer:
    return Writer(sim)


def read_back(sim: GraphSimulator, key: str, policy_id: str) -> dict:
    """The object as the GraphClient reads it (list, details, assignments)."""
    tenant = sim.tenant
    connection = ProviderConnection(
        key="writes",
        tenant_id=tenant.tenant_id,
        client_id=tenant.client_id,
        client_secret=Secret(SECRET),
    )
    client = GraphClient(connection, transport=sim.transport(), sleep=lambda s: None,
                         bucket=TokenBucket())  # fmt: skip
    try:
        return next(o for o in client.read_policies(key) if o["id"] == policy_id)
    finally:
        client.close()


def restorable(key: str, obj: dict, *drop: str) -> dict:
    """A backed-up object as a create body: without what Graph sets, and without nested
    content other writes carry."""
    writes = CONTRACTS[key].writes
    assert writes is not None
    skip = {*writes.read_only, "assignments", *drop}
    return {k: v for k, v in obj.items() if k not in skip and "@odata.context" not in k}


def comparable(key: str, obj: dict) -> dict:
    return stable_payload(CONTRACTS[key], {k: v for k, v in obj.items()
                                           if k not in ("id", "createdDateTime", "assignments")})  # fmt: skip


def group_target(group_id: str) -> dict:
    return {"@odata.type": "#microsoft.graph.groupAssignmentTarget", "groupId": group_id}


# --- create, update, nested content ---------------------------------------------------------------


def test_create_answers_201_with_server_ids_and_stamps_and_reads_back_equal(sim, graph):
    original = sim.tenant.policies("settings_catalog")[0]
    body = restorable("settings_catalog", original)
    body["id"] = "chosen-by-the-client"
    body["settings"] = [
        {k: v for k, v in s.items() if k != "settingDefinitions"} for s in original["settings"]
    ]
    created = graph.send("POST", f"{DM}/configurationPolicies", body)
    assert created.status_code == 201, created.text
    answer = created.json()
    assert answer["id"] not in (original["id"], "chosen-by-the-client")
    assert answer["@odata.context"].endswith(
        "/$metadata#deviceManagement/configurationPolicies/$entity"
    )
    assert answer["createdDateTime"] == answer["lastModifiedDateTime"] > original["createdDateTime"]
    assert answer["settingCount"] == len(original["settings"])
    assert "settings" not in answer  # a navigation property, as on reads
    restored = read_back(sim, "settings_catalog", answer["id"])
    assert restored["assignments"] == []
    # The settings come back whole, their definitions expanded as Graph expands them.
    assert comparable("settings_catalog", restored) == comparable("settings_catalog", original)


def test_a_polymorphic_collection_needs_the_type_and_a_new_ca_policy_has_no_modified_time(
    sim, graph
):
    config = sim.tenant.policies("device_configurations")[0]
    untyped = restorable("device_configurations", config, "@odata.type")
    refused = graph.send("POST", f"{DM}/deviceConfigurations", untyped)
    assert refused.status_code == 400
    assert "abstract" in json.loads(refused.json()["error"]["message"])["Message"]
    made = graph.send(
        "POST", f"{DM}/deviceConfigurations", restorable("device_configurations", config)
    )
    assert made.status_code == 201 and made.json()["version"] == 1
    restored = read_back(sim, "device_configurations", made.json()["id"])
    assert comparable("device_configurations", restored) == comparable(
        "device_configurations", config
    )

    policy = sim.tenant.policies("conditional_access_policies")[0]
    body = restorable("conditional_access_policies", policy) | {"state": "disabled"}
    ca = graph.send("POST", "/v1.0/identity/conditionalAccess/policies", body)
    assert ca.status_code == 201
    assert ca.json()["modifiedDateTime"] is None and ca.json()["createdDateTime"]


def test_patch_changes_only_top_level_fields(sim, graph):
    policy = sim.tenant.policies("settings_catalog")[0]
    answer = graph.send(
        "PATCH",
        f"{DM}/configurationPolicies/{policy['id']}",
        {"name": "Renamed", "settings": [], "settingCount": 0, "id": "other"},
    )
    assert answer.status_code == 200 and answer.json()["name"] == "Renamed"
    after = read_back(sim, "settings_catalog", policy["id"])
    assert after["name"] == "Renamed"
    assert after["settings"] == policy["settings"] and after["settingCount"] == len(
        policy["settings"]
    )
    assert after["lastModifiedDateTime"] > policy["lastModifiedDateTime"]

    config = sim.tenant.policies("device_configurations")[0]
    patched = graph.send("PATCH", f"{DM}/deviceConfigurations/{config['id']}",
                         {"description": "changed"})  # fmt: skip
    assert patched.status_code == 204 and patched.content == b""
    assert "Content-Type" not in patched.headers
    stored = sim.tenant.stored_policy("device_configurations", config["id"])
    assert stored["description"] == "changed" and stored["version"] == config["version"] + 1


def test_settings_catalog_put_replaces_the_settings(sim, graph):
    policy = next(p for p in sim.tenant.policies("settings_catalog") if len(p["settings"]) >= 3)
    kept = [
        {k: v for k, v in s.items() if k != "settingDefinitions"} for s in policy["settings"][1:3]
    ]
    body = restorable("settings_catalog", policy) | {"name": "Two settings", "settings": kept}
    answer = graph.send("PUT", f"{DM}/configurationPolicies/{policy['id']}", body)
    assert answer.status_code == 204
    after = read_back(sim, "settings_catalog", policy["id"])
    assert after["name"] == "Two settings" and after["settingCount"] == 2
    assert [s["id"] for s in after["settings"]] == ["0", "1"]  # Graph numbers them anew
    assert [s["settingInstance"] for s in after["settings"]] == [s["settingInstance"] for s in kept]


def test_assign_replaces_the_whole_set_and_each_type_names_its_own_key(sim, graph):
    config = next(p for p in sim.tenant.policies("device_configurations") if p["assignments"])
    group = sim.tenant.add_group("SG-Restore")["id"]
    url = f"{DM}/deviceConfigurations/{config['id']}/assign"
    answer = graph.send(
        "POST", url, {"assignments": [{"id": "ignored", "target": group_target(group)}]}
    )
    assert answer.status_code == 200
    assert [a["id"] for a in answer.json()["value"]] == [f"{config['id']}_{group}"]
    assert [
        a["target"]["groupId"]
        for a in read_back(sim, "device_configurations", config["id"])["assignments"]
    ] == [group]
    assert graph.send("POST", url, {"assignments": []}).status_code == 200
    assert read_back(sim, "device_configurations", config["id"])["assignments"] == []

    script = sim.tenant.policies("powershell_scripts")[0]
    url = f"{DM}/deviceManagementScripts/{script['id']}/assign"
    wrong = graph.send("POST", url, {"assignments": [{"target": group_target(group)}]})
    assert wrong.status_code == 400
    right = graph.send(
        "POST", url, {"deviceManagementScriptAssignments": [{"target": group_target(group)}]}
    )
    assert right.status_code == 200 and len(right.json()["value"]) == 1
    assert [
        a["target"]["groupId"]
        for a in sim.tenant.stored_policy("powershell_scripts", script["id"])["assignments"]
    ] == [group]


def test_nested_content_has_writes_of_its_own(sim, graph):
    compliance = sim.tenant.policies("compliance_policies")[0]
    body = restorable("compliance_policies", compliance, "scheduledActionsForRule")
    refused = graph.send("POST", f"{DM}/deviceCompliancePolicies", body)
    assert refused.status_code == 400  # Graph wants the scheduled actions on create
    rules = [{"ruleName": "PasswordRequired", "scheduledActionConfigurations": [
        {"actionType": "block", "gracePeriodHours": 12}]}]  # fmt: skip
    made = graph.send(
        "POST", f"{DM}/deviceCompliancePolicies", body | {"scheduledActionsForRule": rules}
    )
    assert made.status_code == 201
    new_id = made.json()["id"]
    rules[0]["scheduledActionConfigurations"][0]["gracePeriodHours"] = 48
    url = f"{DM}/deviceCompliancePolicies/{new_id}/scheduleActionsForRules"
    replaced = graph.send("POST", url, {"deviceComplianceScheduledActionForRules": rules})
    assert replaced.status_code == 200 and len(replaced.json()["value"]) == 1
    actions = read_back(sim, "compliance_policies", new_id)["scheduledActionsForRule"]
    assert [c["gracePeriodHours"] for c in actions[0]["scheduledActionConfigurations"]] == [48]

    admx = sim.tenant.policies("group_policy_configurations")[0]
    definition_id = next(iter(ADMX_DEFINITIONS))
    bind = f"https://graph.microsoft.com/beta/deviceManagement/groupPolicyDefinitions('{definition_id}')"
    presentation = admx_presentation(definition_id)
    delta = {
        "added": [{"enabled": True, "definition@odata.bind": bind, "presentationValues": [
            {"@odata.type": "#microsoft.graph.groupPolicyPresentationValueText", "value": "x",
             "presentation@odata.bind": f"{bind}/presentations('{presentation['id']}')"}]}],
        "updated": [{"id": admx["definitionValues"][0]["id"], "enabled": False}],
        "deletedIds": [v["id"] for v in admx["definitionValues"][1:]],
    }  # fmt: skip
    url = f"{DM}/groupPolicyConfigurations/{admx['id']}/updateDefinitionValues"
    assert graph.send("POST", url, delta).status_code == 204
    values = read_back(sim, "group_policy_configurations", admx["id"])["definitionValues"]
    assert [v["enabled"] for v in values] == [False, True]
    assert values[1]["definition"]["displayName"] == ADMX_DEFINITIONS[definition_id]["displayName"]
    stored = sim.tenant.stored_policy("group_policy_configurations", admx["id"])
    assert stored["definitionValues"][1]["presentationValues"][0]["presentation"] == presentation
    unknown = {"added": [{"definition@odata.bind": bind.replace(definition_id, "nope")}]}
    assert graph.send("POST", url, unknown).status_code == 400


def test_intents_come_from_templates_and_a_deprecated_one_creates_none(sim, graph):
    deprecated, current = (next(t for t, v in TEMPLATES.items() if v["isDeprecated"] is flag)
                           for flag in (True, False))  # fmt: skip
    template = graph.get(f"{DM}/templates/{deprecated}")
    assert template.status_code == 200 and template.json()["isDeprecated"] is True
    body = {"displayName": "BitLocker", "settingsDelta": [
        {"@odata.type": "#microsoft.graph.deviceManagementBooleanSettingInstance",
         "definitionId": "d1", "valueJson": "true"}]}  # fmt: skip
    assert (
        graph.send("POST", f"{DM}/templates/{deprecated}/createInstance", body).status_code == 400
    )
    made = graph.send("POST", f"{DM}/templates/{current}/createInstance", body)
    assert made.status_code == 200 and made.json()["templateId"] == current
    intent_id = made.json()["id"]
    change = {"settings": [{"definitionId": "d1", "valueJson": "false"},
                           {"definitionId": "d2", "valueJson": "1"}]}  # fmt: skip
    url = f"{DM}/intents/{intent_id}/updateSettings"
    assert graph.send("POST", url, change).status_code == 204
    settings = read_back(sim, "endpoint_security_intents", intent_id)["settings"]
    assert [(s["definitionId"], s["valueJson"]) for s in settings] == [("d1", "false"), ("d2", "1")]
    assert settings[0]["@odata.type"].endswith("BooleanSettingInstance")  # merged, not replaced


def test_built_in_objects_take_only_the_writes_graph_allows(sim, graph):
    default_tag = "/beta/deviceManagement/roleScopeTags/0"
    assert graph.send("PATCH", default_tag, {"description": "mine"}).status_code == 400
    global_script = next(
        p for p in sim.tenant.policies("device_health_scripts") if p["isGlobalScript"]
    )
    url = f"{DM}/deviceHealthScripts/{global_script['id']}"
    assert graph.send("PATCH", url, {"description": "mine"}).status_code == 400
    group = sim.tenant.add_group()["id"]
    schedule = {"@odata.type": "#microsoft.graph.deviceHealthScriptDailySchedule", "interval": 1}
    assignment = {
        "target": group_target(group),
        "runRemediationScript": True,
        "runSchedule": schedule,
    }
    assigned = graph.send("POST", url + "/assign", {"deviceHealthScriptAssignments": [assignment]})
    assert assigned.status_code == 200
    stored = sim.tenant.stored_policy("device_health_scripts", global_script["id"])
    assert stored["assignments"][0]["runSchedule"] == schedule

    assignment_filter = sim.tenant.policies("assignment_filters")[0]
    other = "iOS" if assignment_filter["platform"] != "iOS" else "android"
    url = f"{DM}/assignmentFilters/{assignment_filter['id']}"
    assert graph.send("PATCH", url, {"platform": other}).status_code == 400


def test_one_action_can_take_several_writes_and_autopilot_assigns_per_target(sim, graph):
    policy_set = sim.tenant.policies("policy_sets")[0]
    profile = sim.tenant.policies("autopilot_profiles")[0]
    # Added after the policies were generated, so that none is assigned to it yet.
    group = sim.tenant.add_group()["id"]
    url = f"/beta/deviceAppManagement/policySets/{policy_set['id']}/update"
    body = {"assignments": [{"target": group_target(group)}],
            "deletedPolicySetItems": [policy_set["items"][0]["id"]]}  # fmt: skip
    assert graph.send("POST", url, body).status_code == 204
    stored = sim.tenant.stored_policy("policy_sets", policy_set["id"])
    assert [a["target"]["groupId"] for a in stored["assignments"]] == [group]
    assert len(stored["items"]) == len(policy_set["items"]) - 1
    assert graph.send("POST", url, {"nothing": []}).status_code == 400

    url = f"{DM}/windowsAutopilotDeploymentProfiles/{profile['id']}/assignments"
    added = graph.send("POST", url, {"target": group_target(group)})
    assert added.status_code == 201 and added.json()["id"] == f"{profile['id']}_{group}"
    assert graph.send("POST", url, {"target": group_target(group)}).status_code == 409
    assert graph.send("DELETE", f"{url}/{added.json()['id']}").status_code == 200
    assert (
        sim.tenant.stored_policy("autopilot_profiles", profile["id"])["assignments"]
        == profile["assignments"]
    )


# --- permissions, $batch, throttling, lost responses -------------------------------------------


def test_writes_need_the_readwrite_role_and_ca_needs_all_three(sim):
    sim.granted_roles = list(all_permissions())
    graph = Writer(sim)
    config = sim.tenant.policies("device_configurations")[0]
    before = len(sim.tenant.stored_policies("device_configurations"))
    denied = graph.send(
        "POST", f"{DM}/deviceConfigurations", restorable("device_configurations", config)
    )
    assert denied.status_code == 403
    message = json.loads(denied.json()["error"]["message"])["Message"]
    assert "following scopes: DeviceManagementConfiguration.ReadWrite.All - Operation" in message
    assert len(sim.tenant.stored_policies("device_configurations")) == before
    # Reads still work with the read-only grant.
    assert graph.get(f"{DM}/deviceConfigurations").status_code == 200

    policy = restorable(
        "conditional_access_policies", sim.tenant.policies("conditional_access_policies")[0]
    )
    sim.granted_roles = [*all_permissions(), "Policy.ReadWrite.ConditionalAccess"]
    graph = Writer(sim)
    ca = graph.send("POST", "/v1.0/identity/conditionalAccess/policies", policy)
    assert ca.status_code == 403 and ca.json()["error"]["code"] == "AccessDenied"
    sim.granted_roles = [
        *all_permissions(),
        "Policy.ReadWrite.ConditionalAccess",
        "Application.Read.All",
    ]
    graph = Writer(sim)
    assert (
        graph.send("POST", "/v1.0/identity/conditionalAccess/policies", policy).status_code == 201
    )


def test_batch_runs_writes_after_what_they_depend_on(sim, graph):
    config = sim.tenant.policies("device_configurations")[0]
    url = f"/deviceManagement/deviceConfigurations/{config['id']}"
    json_header = {"Content-Type": "application/json"}

    def patch(sub_id: str, name: str, after: list[str], target: str = url) -> dict:
        return {"id": sub_id, "method": "PATCH", "url": target, "headers": json_header,
                "body": {"displayName": name}, "dependsOn": after}  # fmt: skip

    answer = graph.batch("beta", [
        patch("last", "second", ["first"]),
        patch("first", "first", []),
        patch("missing", "x", [], "/deviceManagement/deviceConfigurations/not-there"),
        patch("after-missing", "never", ["missing"]),
    ])  # fmt: skip
    assert answer.status_code == 200
    responses = {r["id"]: r for r in answer.json()["responses"]}
    assert [r["id"] for r in answer.json()["responses"]] == [
        "last",
        "first",
        "missing",
        "after-missing",
    ]
    assert responses["first"]["status"] == responses["last"]["status"] == 204
    assert "body" not in responses["first"]
    assert responses["missing"]["status"] == 404
    assert responses["after-missing"]["status"] == 424
    assert (
        sim.tenant.stored_policy("device_configurations", config["id"])["displayName"] == "second"
    )

    no_type = graph.batch("beta", [{"id": "1", "method": "PATCH", "url": url, "body": {}}])
    assert no_type.status_code == 400
    outside = graph.batch("beta", [patch("1", "x", ["9"])])
    assert outside.status_code == 400
    cycle = graph.batch("beta", [patch("1", "x", ["2"]), patch("2", "y", ["1"])])
    assert cycle.status_code == 400 and "cycle" in cycle.json()["error"]["message"]


def test_intune_writes_are_throttled_at_100_per_20_seconds_per_app(sim, graph):
    now = [1000.0]
    sim.clock = lambda: now[0]
    config = sim.tenant.policies("device_configurations")[0]
    url = f"{DM}/deviceConfigurations/{config['id']}"
    for n in range(90):
        assert graph.send("PATCH", url, {"description": str(n)}).status_code == 204
    now[0] += 5
    json_header = {"Content-Type": "application/json"}
    batch = [{"id": str(n), "method": "PATCH", "url": url.removeprefix("/beta"),
              "headers": json_header, "body": {"description": "b"}} for n in range(10)]  # fmt: skip
    assert [r["status"] for r in graph.batch("beta", batch).json()["responses"]] == [204] * 10
    throttled = graph.send("PATCH", url, {"description": "one too many"})
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "15"
    assert sim.tenant.stored_policy("device_configurations", config["id"])["description"] == "b"
    # Reads and conditional access (another service) are not Intune writes.
    assert graph.get(f"{DM}/deviceConfigurations").status_code == 200
    policy = sim.tenant.policies("conditional_access_policies")[0]
    ca = graph.send(
        "PATCH", f"/v1.0/identity/conditionalAccess/policies/{policy['id']}", {"state": "disabled"}
    )
    assert ca.status_code == 204
    now[0] += 15
    assert graph.send("PATCH", url, {"description": "later"}).status_code == 204


def test_write_limits_count_each_app_and_the_whole_tenant():
    limits = WriteLimits()
    assert all(limits.admit("app-a", 0.0) is None for _ in range(100))
    assert limits.admit("app-a", 1.0) == 19.0
    assert all(limits.admit("app-b", 2.0) is None for _ in range(100))
    assert limits.admit("app-c", 3.0) == 17.0  # the tenant's 200, for all apps
    assert limits.admit("app-c", 20.0) is None  # app-a's first writes left the window


def test_a_lost_response_leaves_the_create_applied(sim, graph):
    config = sim.tenant.policies("device_configurations")[0]
    body = restorable("device_configurations", config) | {"displayName": "Lost answer"}
    sim.faults.once("deviceConfigurations", "drop_response")
    # A read does not take the fault: only a write does.
    assert graph.get(f"{DM}/deviceConfigurations").status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        graph.send("POST", f"{DM}/deviceConfigurations", body)
    named = [
        p for p in sim.tenant.policies("device_configurations") if p["displayName"] == "Lost answer"
    ]
    assert len(named) == 1 and sim.faults.pending_one_shots == 0

    sim.faults.once("deviceConfigurations", "drop_response")
    sub = {"id": "1", "method": "POST", "url": "/deviceManagement/deviceConfigurations",
           "headers": {"Content-Type": "application/json"}, "body": body}  # fmt: skip
    response = graph.batch("beta", [sub]).json()["responses"][0]
    assert response["status"] == 504
    named = [
        p for p in sim.tenant.policies("device_configurations") if p["displayName"] == "Lost answer"
    ]
    assert len(named) == 2


def test_a_lost_response_over_sockets_drops_the_connection(sim):
    config = sim.tenant.policies("device_configurations")[0]
    body = restorable("device_configurations", config) | {"displayName": "Over sockets"}
    with sim.serve() as base_url:
        graph = Writer(sim, base=base_url, login=base_url)
        sim.faults.once("deviceConfigurations", "drop_response")
        with pytest.raises(httpx.TransportError):
            graph.send("POST", f"{DM}/deviceConfigurations", body)
        graph.http = httpx.Client()
        assert graph.send("POST", f"{DM}/deviceConfigurations", body).status_code == 201
    named = [
        p
        for p in sim.tenant.policies("device_configurations")
        if p["displayName"] == "Over sockets"
    ]
    assert len(named) == 2
