"""The Graph simulator speaks Microsoft Graph and Entra over HTTP: these tests are the client
side, using httpx directly against the in-process transport and real loopback sockets."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
import tracemalloc

import httpx
import pytest

from atlas_dagster.simulator import (
    FaultPlan,
    GraphSimulator,
    SimulatedTenant,
    install_simulator,
    simulator_for,
    uninstall_simulator,
)
from atlas_dagster.simulator.auth import b64url, decode_jwt_part
from graph_contracts import CONTRACTS, POLICY_CONTRACTS, all_permissions, odata_eq

GRAPH = "https://graph.microsoft.com"
LOGIN = "https://login.microsoftonline.com"
SECRET = "test-secret"


def token_response(http: httpx.Client, sim: GraphSimulator, **form: str) -> httpx.Response:
    data = {
        "grant_type": "client_credentials",
        "client_id": sim.tenant.client_id,
        "client_secret": SECRET,
        "scope": f"{GRAPH}/.default",
    } | form
    tenant = form.pop("tenant", None) or sim.tenant.tenant_id
    data.pop("tenant", None)
    return http.post(f"{LOGIN}/{tenant}/oauth2/v2.0/token", data=data)


class Graph:
    """A bare Graph caller: a token from the simulator, then plain GETs and $batch posts."""

    def __init__(self, sim: GraphSimulator, base: str = GRAPH, login: str = LOGIN):
        self.sim = sim
        self.base = base
        self.http = httpx.Client(transport=sim.transport() if base == GRAPH else None)
        self.login = login
        self.token = self.new_token()

    def new_token(self) -> str:
        response = self.http.post(
            f"{self.login}/{self.sim.tenant.tenant_id}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": self.sim.tenant.client_id,
                "client_secret": SECRET,
                "scope": f"{GRAPH}/.default",
            },
        )
        assert response.status_code == 200, response.text
        return response.json()["access_token"]

    def get(self, url: str, **headers: str) -> httpx.Response:
        if not url.startswith("http"):
            url = self.base + url
        return self.http.get(url, headers={"Authorization": f"Bearer {self.token}", **headers})

    def batch(self, version: str, requests: list[dict]) -> httpx.Response:
        return self.http.post(
            f"{self.base}/{version}/$batch",
            json={"requests": requests},
            headers={"Authorization": f"Bearer {self.token}"},
        )

    def follow(self, url: str) -> list[dict]:
        """Every page of a collection; the pages' JSON bodies."""
        pages = []
        next_url: str | None = url
        while next_url:
            response = self.get(next_url)
            assert response.status_code == 200, response.text
            pages.append(response.json())
            next_url = pages[-1].get("@odata.nextLink")
        return pages


@pytest.fixture(scope="module")
def small() -> SimulatedTenant:
    return SimulatedTenant.generate("small", 7)


@pytest.fixture
def sim() -> GraphSimulator:
    return GraphSimulator(SimulatedTenant.generate("small", 7), client_secret=SECRET)


@pytest.fixture
def graph(sim) -> Graph:
    return Graph(sim)


# --- Tenants -------------------------------------------------------------------------------------


def test_same_profile_and_seed_give_the_same_tenant_and_another_seed_another():
    a, b, c = (SimulatedTenant.generate("small", s) for s in (7, 7, 8))
    assert (a.tenant_id, a.client_id) == (b.tenant_id, b.client_id)
    assert a.tenant_id != c.tenant_id
    for key in POLICY_CONTRACTS:
        assert a.policies(key) == b.policies(key)
    assert list(a.groups()) == list(b.groups())
    assert [g["id"] for g in a.groups()] != [g["id"] for g in c.groups()]


def test_small_profile_sizes_and_realistic_payloads(small):
    assert 150 <= small.group_count <= 250
    for key in POLICY_CONTRACTS:
        objs = small.policies(key)
        assert len(objs) >= 3, key
        assert all(o.get("@odata.type", "").startswith("#microsoft.graph.") for o in objs), key
    enrollment = small.policies("enrollment_configurations")
    defaults = [o for o in enrollment if o["id"].endswith("_DefaultLimit")]
    assert defaults and defaults[0]["priority"] == 0
    group_ids = {g["id"] for g in small.groups()}
    filter_ids = {f["id"] for f in small.policies("assignment_filters")}
    targets = [
        a["target"]
        for k in POLICY_CONTRACTS
        for o in small.policies(k)
        for a in o.get("assignments") or []
    ]
    assert {t["groupId"] for t in targets if "groupId" in t} <= group_ids
    used_filters = {t["deviceAndAppManagementAssignmentFilterId"] for t in targets} - {None}
    assert used_filters and used_filters <= filter_ids
    catalog = small.policies("settings_catalog")
    assert all(len(p["settings"]) == p["settingCount"] for p in catalog)


def test_some_policies_share_a_display_name():
    tenant = SimulatedTenant.generate("medium", 1)
    names = [o["displayName"] for o in tenant.policies("device_configurations")]
    assert len(set(names)) < len(names)


def test_mutate_changes_policies_and_groups_and_says_what(small):
    tenant = SimulatedTenant.generate("small", 7)
    before = {k: tenant.policies(k) for k in POLICY_CONTRACTS}
    groups_before = list(tenant.groups())
    done = tenant.mutate(random.Random(1), 30)
    assert len(done) == 30 and all(isinstance(d, str) and d for d in done)
    after = {k: tenant.policies(k) for k in POLICY_CONTRACTS}
    assert after != before or list(tenant.groups()) != groups_before
    assert tenant.change_sequence > 0


# --- Sign-in ---------------------------------------------------------------------------------------


def test_token_roles_list_the_granted_permissions(sim):
    http = httpx.Client(transport=sim.transport())
    claims = decode_jwt_part(token_response(http, sim).json()["access_token"], 1)
    assert claims["roles"] == sorted(all_permissions())
    assert (claims["tid"], claims["appid"]) == (sim.tenant.tenant_id, sim.tenant.client_id)
    assert claims["exp"] > claims["iat"]
    sim.granted_roles = ["GroupMember.Read.All"]
    claims = decode_jwt_part(token_response(http, sim).json()["access_token"], 1)
    assert claims["roles"] == ["GroupMember.Read.All"]


def test_sign_in_errors_carry_entra_codes(sim):
    http = httpx.Client(transport=sim.transport())
    wrong = token_response(http, sim, client_secret="nope")
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client" and wrong.json()["error_codes"] == [7000215]
    assert "AADSTS7000215" in wrong.json()["error_description"]
    unknown_tenant = token_response(http, sim, tenant="00000000-0000-0000-0000-000000000009")
    assert unknown_tenant.status_code == 400 and unknown_tenant.json()["error_codes"] == [90002]
    oidc = http.get(
        f"{LOGIN}/00000000-0000-0000-0000-000000000009/v2.0/.well-known/openid-configuration"
    )
    assert oidc.status_code == 400 and "AADSTS90002" in oidc.json()["error_description"]
    unknown_client = token_response(http, sim, client_id="11111111-1111-1111-1111-111111111111")
    assert unknown_client.status_code == 400 and unknown_client.json()["error_codes"] == [700016]


def test_openid_configuration_points_at_the_requested_login_host(sim):
    http = httpx.Client(transport=sim.transport())
    url = f"{LOGIN}/{sim.tenant.tenant_id}/v2.0/.well-known/openid-configuration"
    doc = http.get(url).json()
    assert doc["token_endpoint"] == f"{LOGIN}/{sim.tenant.tenant_id}/oauth2/v2.0/token"
    other = http.get(url.replace(LOGIN, "https://login.example.test")).json()
    assert other["token_endpoint"].startswith("https://login.example.test/")


def _assertion(thumbprint_hex: str, client_id: str) -> str:
    header = {"alg": "RS256", "typ": "JWT", "x5t": b64url(bytes.fromhex(thumbprint_hex))}
    claims = {"aud": "x", "iss": client_id, "sub": client_id, "exp": int(time.time()) + 600}
    part = lambda d: b64url(json.dumps(d).encode())  # noqa: E731
    return f"{part(header)}.{part(claims)}.c2lnbmF0dXJl"


def test_certificate_assertion_accepted_when_registered_and_refused_when_expired(sim):
    http = httpx.Client(transport=sim.transport())
    good = hashlib.sha1(b"good").hexdigest()
    old = hashlib.sha1(b"old").hexdigest()
    sim.register_certificate(good, time.time() + 3600)
    sim.register_certificate(old, time.time() - 1)
    form = {
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_secret": "",
    }

    def sign_in(thumbprint: str) -> httpx.Response:
        data = form | {"client_assertion": _assertion(thumbprint, sim.tenant.client_id)}
        data.pop("client_secret")
        return http.post(
            f"{LOGIN}/{sim.tenant.tenant_id}/oauth2/v2.0/token",
            data=data
            | {
                "grant_type": "client_credentials",
                "client_id": sim.tenant.client_id,
                "scope": f"{GRAPH}/.default",
            },
        )

    ok = sign_in(good)
    assert ok.status_code == 200
    assert decode_jwt_part(ok.json()["access_token"], 1)["appidacr"] == "2"
    expired = sign_in(old)
    assert expired.status_code == 401 and expired.json()["error_codes"] == [700027]
    unknown = sign_in(hashlib.sha1(b"stranger").hexdigest())
    assert unknown.status_code == 401 and "AADSTS700027" in unknown.json()["error_description"]


def test_graph_needs_a_bearer_token_from_this_simulator_and_revocation_bites(sim, graph):
    http = httpx.Client(transport=sim.transport())
    none = http.get(f"{GRAPH}/beta/deviceManagement/deviceCategories")
    assert none.status_code == 401 and none.json()["error"]["code"] == "InvalidAuthenticationToken"
    header, payload, _ = graph.token.split(".")
    forged = http.get(
        f"{GRAPH}/beta/deviceManagement/deviceCategories",
        headers={"Authorization": f"Bearer {header}.{payload}.Zm9yZ2Vk"},
    )
    assert forged.status_code == 401
    assert graph.get("/beta/deviceManagement/deviceCategories").status_code == 200
    sim.revoke_tokens()
    assert graph.get("/beta/deviceManagement/deviceCategories").status_code == 401


# --- Collections, paging, $expand --------------------------------------------------------------


def test_settings_catalog_settings_page_at_25_with_absolute_next_links():
    sim = GraphSimulator(SimulatedTenant.generate("large", 2), client_secret=SECRET)
    graph = Graph(sim)
    big = [p for p in sim.tenant.policies("settings_catalog") if p["settingCount"] > 60]
    assert big, "the large profile has settings catalog policies with more than 60 settings"
    policy = big[0]
    url = CONTRACTS["settings_catalog.settings"].relative_url(policy["id"], top=100)
    pages = graph.follow(f"/beta{url}")
    assert len(pages) == 3 and [len(p["value"]) for p in pages[:2]] == [25, 25]
    assert pages[0]["@odata.nextLink"].startswith(
        f"{GRAPH}/beta/deviceManagement/configurationPolicies/{policy['id']}/settings?"
    )
    assert "$skiptoken=" in pages[0]["@odata.nextLink"]
    settings = [s for p in pages for s in p["value"]]
    assert settings == policy["settings"]
    assert all("settingDefinitions" in s for s in settings)


def test_lists_honour_select_and_only_the_expansions_a_contract_names(graph, sim):
    listed = graph.get("/beta/deviceManagement/deviceConfigurations?$expand=assignments").json()
    assert listed["@odata.context"].startswith(f"{GRAPH}/beta/$metadata#")
    assert all("assignments" in o and "@odata.type" in o for o in listed["value"])
    bare = graph.get("/beta/deviceManagement/deviceConfigurations").json()
    assert all("assignments" not in o for o in bare["value"])
    refused = graph.get("/beta/deviceManagement/deviceConfigurations?$expand=settings")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "BadRequest"
    selected = graph.get("/beta/deviceManagement/configurationPolicies?$select=id,name").json()
    assert all(set(o) == {"@odata.type", "id", "name"} for o in selected["value"])
    compliance = graph.get("/beta" + CONTRACTS["compliance_policies"].relative_url()).json()[
        "value"
    ]
    rules = [r for o in compliance for r in o["scheduledActionsForRule"]]
    assert rules and all("scheduledActionConfigurations" in r for r in rules)


def test_users_are_found_by_display_name_filter_and_other_clauses_are_refused(graph, sim):
    user = {"@odata.type": "#microsoft.graph.user"}
    wanted = sim.tenant.add_policy("users", {**user, "displayName": "O'Brien"})
    sim.tenant.add_policy("users", {**user, "displayName": "OBrien"})
    url = "/v1.0" + CONTRACTS["users"].relative_url(where=odata_eq("displayName", "O'Brien"))
    assert "'O''Brien'" in url and " " not in url
    found = graph.get(url).json()["value"]
    assert [u["id"] for u in found] == [wanted["id"]]
    assert set(found[0]) == {"@odata.type", "id", "displayName"}  # as $select asks
    one = graph.get("/v1.0" + CONTRACTS["users.get"].relative_url(wanted["id"]))
    assert one.status_code == 200 and one.json()["displayName"] == "O'Brien"
    assert graph.get("/v1.0/users/not-there").status_code == 404
    refused = graph.get("/v1.0/users?$filter=startswith(displayName,'O')")
    assert refused.status_code == 400 and "filter" in refused.json()["error"]["message"]


def test_top_is_capped_by_the_server_and_pages_link_on(graph, sim):
    for _ in range(120):
        sim.tenant.add_policy("device_categories")
    pages = graph.follow("/beta/deviceManagement/deviceCategories?$top=500")
    assert len(pages[0]["value"]) == 100 and len(pages) == 2
    assert sum(len(p["value"]) for p in pages) == len(sim.tenant.policies("device_categories"))


def test_script_lists_omit_content_and_item_reads_return_it(graph, sim):
    listed = graph.get("/beta/deviceManagement/deviceManagementScripts?$expand=assignments").json()
    assert listed["value"] and all("scriptContent" not in o for o in listed["value"])
    item = graph.get(
        f"/beta/deviceManagement/deviceManagementScripts/{listed['value'][0]['id']}"
    ).json()
    assert base64.b64decode(item["scriptContent"]).startswith(b"# generated")
    assert item["@odata.context"].endswith("/$entity")
    missing = graph.get("/beta/deviceManagement/deviceManagementScripts/not-there")
    assert missing.status_code == 404


def test_unknown_paths_and_versions_answer_in_graphs_shape(graph):
    for path in ("/beta/users", "/v1.0/deviceManagement/deviceConfigurations", "/v2/groups"):
        response = graph.get(path, **{"client-request-id": "abc-123"})
        assert response.status_code == 404, path
        assert response.json()["error"]["code"]
        assert response.headers["client-request-id"] == "abc-123" and response.headers["request-id"]


# --- Permissions -----------------------------------------------------------------------------------


def test_missing_permissions_answer_403_in_each_services_shape(sim):
    sim.granted_roles = []
    graph = Graph(sim)
    intune = graph.get("/beta/deviceManagement/deviceConfigurations", **{"client-request-id": "c1"})
    assert intune.status_code == 403 and intune.headers["client-request-id"] == "c1"
    error = intune.json()["error"]
    assert error["code"] == "Forbidden" and error["innerError"]["request-id"]
    inner = json.loads(error["message"])
    assert inner["_version"] == 3
    assert (
        "following scopes: DeviceManagementConfiguration.Read.All, DeviceManagementConfiguration.ReadWrite.All - Operation ID"
        in inner["Message"]
    )
    groups = graph.get("/v1.0/groups/delta")
    assert groups.status_code == 403
    assert groups.json()["error"]["code"] == "Authorization_RequestDenied"
    ca = graph.get("/v1.0/identity/conditionalAccess/policies")
    assert ca.status_code == 403 and ca.json()["error"]["code"] == "AccessDenied"


def test_readwrite_grants_read(sim):
    sim.granted_roles = ["DeviceManagementConfiguration.ReadWrite.All"]
    graph = Graph(sim)
    assert graph.get("/beta/deviceManagement/deviceConfigurations").status_code == 200


def test_changing_granted_roles_revokes_earlier_tokens(sim, graph):
    assert graph.get("/beta/deviceManagement/deviceCategories").status_code == 200
    sim.granted_roles = [
        r for r in sim.granted_roles if r != "DeviceManagementManagedDevices.Read.All"
    ]
    assert graph.get("/beta/deviceManagement/deviceCategories").status_code == 401
    graph.token = graph.new_token()
    assert graph.get("/beta/deviceManagement/deviceCategories").status_code == 403


# --- Groups delta ----------------------------------------------------------------------------------


def _delta_round(graph: Graph, url: str) -> tuple[list[dict], str, int]:
    pages = graph.follow(url)
    return [o for p in pages for o in p["value"]], pages[-1]["@odata.deltaLink"], len(pages)


def test_groups_delta_initial_then_incremental_with_removed_reasons(graph, sim):
    tenant = sim.tenant
    objects, delta_link, pages = _delta_round(
        graph, "/v1.0" + CONTRACTS["groups_delta"].relative_url()
    )
    assert pages == -(-tenant.group_count // 100)
    assert {o["id"] for o in objects} == {g["id"] for g in tenant.groups()}
    assert "$deltatoken=" in delta_link
    ids = [o["id"] for o in objects]
    tenant.update_group(ids[0], {"displayName": "Renamed"})
    tenant.delete_group(ids[1])
    tenant.delete_group(ids[2], permanent=True)
    added = tenant.add_group("Brand new")
    changes, delta_link, _ = _delta_round(graph, delta_link)
    by_id = {c["id"]: c for c in changes}
    assert set(by_id) == {ids[0], ids[1], ids[2], added["id"]}
    assert by_id[ids[0]]["displayName"] == "Renamed"
    assert by_id[ids[1]] == {"id": ids[1], "@removed": {"reason": "changed"}}
    assert by_id[ids[2]] == {"id": ids[2], "@removed": {"reason": "deleted"}}
    assert set(by_id[ids[0]]) - {"@odata.type"} == set(CONTRACTS["groups_delta"].select)
    sim.stats.reset()
    again = graph.get(delta_link).json()
    assert again["value"] == [] and "@odata.deltaLink" in again and "@odata.nextLink" not in again
    assert sim.stats.total == 1


def test_expired_delta_tokens_answer_410(graph, sim):
    _, delta_link, _ = _delta_round(graph, "/v1.0/groups/delta?$select=id,displayName")
    first_page = graph.get("/v1.0/groups/delta").json()
    sim.expire_delta_tokens()
    for url in (delta_link, first_page["@odata.nextLink"]):
        gone = graph.get(url)
        assert gone.status_code == 410
        assert gone.json()["error"]["code"] == "syncStateNotFound"
    assert graph.get("/v1.0/groups/delta?$deltatoken=garbage").status_code == 410


def test_group_members_split_across_pages_and_merge_to_the_full_list(graph, sim):
    objects, _, _ = _delta_round(graph, "/v1.0/groups/delta?$select=id,displayName,members")
    merged: dict[str, list] = {}
    seen_twice = set()
    for obj in objects:
        if obj["id"] in merged:
            seen_twice.add(obj["id"])
            assert set(obj) == {"id", "members@delta"}
        merged.setdefault(obj["id"], []).extend(obj.get("members@delta", []))
    assert seen_twice, "some group's members continue on a later page"
    for group_id in list(seen_twice)[:10]:
        assert merged[group_id] == sim.tenant.group_members(group_id)


# --- $batch ----------------------------------------------------------------------------------------


def test_batch_caps_at_20_and_answers_each_sub_request(graph, sim):
    many = [
        {"id": str(n), "method": "GET", "url": "/deviceManagement/deviceCategories"}
        for n in range(21)
    ]
    too_many = graph.batch("beta", many)
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "BadRequest"
    scripts = sim.tenant.policies("powershell_scripts")
    sim.faults.once(f"deviceManagementScripts/{scripts[1]['id']}", "429")
    answer = graph.batch(
        "beta",
        [{"id": str(n), "method": "GET", "url": f"/deviceManagement/deviceManagementScripts/{s['id']}"}
         for n, s in enumerate(scripts)],
    )  # fmt: skip
    assert answer.status_code == 200
    responses = {r["id"]: r for r in answer.json()["responses"]}
    assert responses["1"]["status"] == 429 and responses["1"]["headers"]["Retry-After"] == "0.2"
    assert all(r["status"] == 200 for k, r in responses.items() if k != "1")
    assert responses["0"]["body"]["scriptContent"]
    assert sim.stats.batch_sub_requests == len(scripts)
    assert sim.stats.per_contract["powershell_scripts.item"] == len(scripts)


def test_batch_sub_responses_page_and_check_permissions_each():
    sim = GraphSimulator(SimulatedTenant.generate("large", 2), client_secret=SECRET)
    sim.granted_roles = [
        r for r in all_permissions() if r != "DeviceManagementServiceConfig.Read.All"
    ]
    graph = Graph(sim)
    policy = next(p for p in sim.tenant.policies("settings_catalog") if p["settingCount"] > 25)
    answer = graph.batch(
        "beta",
        [
            {
                "id": "1",
                "method": "GET",
                "url": CONTRACTS["settings_catalog.settings"].relative_url(policy["id"]),
            },
            {"id": "2", "method": "GET", "url": "/deviceManagement/deviceEnrollmentConfigurations"},
        ],
    ).json()
    responses = {r["id"]: r for r in answer["responses"]}
    assert responses["1"]["status"] == 200
    assert responses["1"]["body"]["@odata.nextLink"].startswith(f"{GRAPH}/beta/deviceManagement/")
    assert responses["2"]["status"] == 403
    assert json.loads(responses["2"]["body"]["error"]["message"])["_version"] == 3


# --- Faults ----------------------------------------------------------------------------------------


def test_fault_plan_throttles_breaks_and_times_out_on_schedule(graph, sim):
    url = "/beta/deviceManagement/deviceCategories"
    sim.faults = FaultPlan(throttle_every=3, retry_after="0.05")
    statuses = [graph.get(url).status_code for _ in range(6)]
    assert statuses == [200, 200, 429, 200, 200, 429]
    sim.faults = FaultPlan(malformed_every=1)
    broken = graph.get(url)
    assert broken.status_code == 200
    with pytest.raises(ValueError):
        json.loads(broken.content)
    sim.faults = FaultPlan(timeout_every=1)
    with pytest.raises(httpx.ReadTimeout):
        graph.get(url)
    sim.faults = FaultPlan(unavailable_every=1)
    unavailable = graph.get(url)
    assert unavailable.status_code == 503 and unavailable.json()["error"]["code"]


def test_one_shot_faults_hit_matching_paths_only(graph, sim):
    sim.faults.once("deviceCategories", "503", count=2).once("groups/delta", "410")
    assert graph.get("/beta/deviceManagement/deviceShellScripts").status_code == 200
    assert [graph.get("/beta/deviceManagement/deviceCategories").status_code for _ in range(3)] == [
        503,
        503,
        200,
    ]
    assert graph.get("/v1.0/groups/delta").status_code == 410
    sim.faults.once("deviceCategories", "401")
    assert graph.get("/beta/deviceManagement/deviceCategories").status_code == 401
    assert sim.faults.pending_one_shots == 0


def test_foreign_next_links_point_off_the_graph_host(graph, sim):
    sim.faults = FaultPlan(foreign_next_link=True)
    page = graph.get("/v1.0/groups/delta").json()
    assert page["@odata.nextLink"].startswith("https://evil.example.com/")


def test_latency_is_added_per_request(graph, sim):
    sim.faults = FaultPlan(latency_s=0.05)
    started = time.monotonic()
    graph.get("/beta/deviceManagement/deviceCategories")
    assert time.monotonic() - started >= 0.05


def test_stats_count_requests_by_contract_and_reset(graph, sim):
    sim.stats.reset()
    graph.get("/beta/deviceManagement/deviceCategories")
    graph.get("/v1.0/groups/delta")
    graph.new_token()
    assert sim.stats.total == 2 and sim.stats.token_requests == 1
    assert sim.stats.per_contract["device_categories"] == 1
    assert sim.stats.per_contract["groups_delta"] == 1
    sim.stats.reset()
    assert sim.stats.total == 0 and not sim.stats.per_contract


# --- Sockets, registry, scale ----------------------------------------------------------------------


def test_serve_answers_real_http_on_loopback(sim):
    with sim.serve() as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        graph = Graph(sim, base=base_url, login=base_url)
        page = graph.get("/v1.0/groups/delta").json()
        assert page["@odata.nextLink"].startswith(base_url + "/v1.0/groups/delta")
        sim.faults = FaultPlan(timeout_every=1)
        with pytest.raises(httpx.TransportError):
            graph.get("/v1.0/groups/delta")


def test_registry_creates_once_and_tests_can_install_their_own():
    first = simulator_for("registry-test", "small", 5)
    assert simulator_for("registry-test", "small", 5) is first
    mine = GraphSimulator(SimulatedTenant.generate("small", 6))
    install_simulator("registry-test", mine)
    assert simulator_for("registry-test", "small", 5) is mine
    uninstall_simulator("registry-test")
    assert simulator_for("registry-test", "small", 5) not in (first, mine)
    uninstall_simulator("registry-test")


def test_xlarge_groups_are_generated_on_demand_without_materialising():
    tracemalloc.start()
    try:
        tenant = SimulatedTenant.generate("xlarge", 1)
        assert tenant.group_count >= 200_000
        last_id, last = tenant.group_at(tenant.group_positions - 1)
        assert last is not None and tenant.group_by_id(last_id) == last
        tenant.delete_group(last_id)
        assert tenant.group_count == tenant.base_group_count - 1
        sim = GraphSimulator(tenant, client_secret=SECRET)
        page = Graph(sim).get("/v1.0/groups/delta").json()
        assert len(page["value"]) == 100
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


def test_xlarge_holds_at_least_5000_policies():
    tenant = SimulatedTenant.generate("xlarge", 1)
    assert sum(len(tenant.stored_policies(k)) for k in POLICY_CONTRACTS) >= 5000


def test_msal_signs_in_with_a_registered_certificate_and_fails_once_it_expired(tmp_path, sim):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from atlas_dagster.config import Certificate, ProviderConnection
    from atlas_dagster.graph import GraphClient, TokenBucket
    from atlas_dagster.reasons import GraphError

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "app.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    thumbprint = hashlib.sha1(b"app certificate").hexdigest().upper()

    def client(name: str) -> GraphClient:
        connection = ProviderConnection(
            key=name,
            display_name=name,
            tenant_id=sim.tenant.tenant_id,
            client_id=sim.tenant.client_id,
            certificate=Certificate(private_key_path=str(pem), thumbprint=thumbprint),
        )
        return GraphClient(
            connection, transport=sim.transport(), sleep=lambda s: None, bucket=TokenBucket()
        )

    sim.register_certificate(thumbprint, time.time() + 3600)
    assert client("cert-ok").token_claims()["appidacr"] == "2"
    sim.register_certificate(thumbprint, time.time() - 1)
    with pytest.raises(GraphError) as failed:
        client("cert-expired").token_claims()
    assert failed.value.reason_code == "provider_auth_failed"
    assert "AADSTS700027" in failed.value.message
