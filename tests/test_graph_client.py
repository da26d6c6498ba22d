"""The GraphClient against hand-written httpx handlers that answer in real Graph shapes."""

from __future__ import annotations

import base64
import json
import logging
import random
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from atlas_dagster import reasons
from atlas_dagster.config import Certificate, ProviderConnection, Secret
from atlas_dagster.graph import GraphClient, TokenBucket, parse_error_body, retry_after_seconds
from atlas_dagster.reasons import DeltaExpired, GraphError
from atlas_dagster.resources.graph import GraphClientResource, client_for

TENANT = "6f1c2d3e-0000-4000-8000-000000000001"
CLIENT = "1b2c3d4e-0000-4000-8000-000000000002"
SECRET = "s3cr3t-Value~never-shown"
GRAPH = "https://graph.microsoft.com"
LOGIN = "http://127.0.0.1:8765"
SETTINGS = f"{GRAPH}/beta/deviceManagement/configurationPolicies"

Handler = Callable[[httpx.Request], httpx.Response]


def jwt(claims: dict) -> str:
    def seg(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{seg({'alg': 'RS256', 'typ': 'JWT'})}.{seg(claims)}.c2lnbmF0dXJl"


def page(values: list, next_link: str | None = None, **extra) -> httpx.Response:
    body = {"@odata.context": f"{GRAPH}/beta/$metadata#collection", "value": values, **extra}
    if next_link:
        body["@odata.nextLink"] = next_link
    return httpx.Response(200, json=body, headers={"request-id": "req-1"})


def graph_error(status: int, code: str, message: str, headers: dict | None = None):
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {"date": "2024-07-07T21:59:24", "request-id": "r-403"},
        }
    }
    return httpx.Response(status, json=body, headers=headers or {})


class FakeTenant:
    """Entra's discovery and token endpoints plus a Graph handler; records every request."""

    def __init__(self, graph: Handler, *, roles: tuple[str, ...] = ("Group.Read.All",)):
        self.graph = graph
        self.roles = roles
        self.requests: list[httpx.Request] = []
        self.token_posts: list[httpx.Request] = []
        self.tokens_issued = 0
        self.token_error: dict | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = str(request.url)
        if url.startswith(LOGIN):
            return self.login(request)
        return self.graph(request)

    def login(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/v2.0/.well-known/openid-configuration"):
            base = f"https://login.microsoftonline.com/{TENANT}"
            return httpx.Response(
                200,
                json={
                    "token_endpoint": f"{base}/oauth2/v2.0/token",
                    "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                    "issuer": f"{base}/v2.0",
                },
            )
        if path.endswith("/oauth2/v2.0/token"):
            self.token_posts.append(request)
            if self.token_error:
                return httpx.Response(401, json=self.token_error)
            self.tokens_issued += 1
            token = jwt(
                {"tid": TENANT, "appid": CLIENT, "roles": list(self.roles), "n": self.tokens_issued}
            )
            return httpx.Response(
                200,
                json={
                    "token_type": "Bearer",
                    "expires_in": 3599,
                    "ext_expires_in": 3599,
                    "access_token": token,
                },
            )
        return httpx.Response(404)

    def graph_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if not str(r.url).startswith(LOGIN)]


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


_counter = iter(range(10**6))


def connection(**kw) -> ProviderConnection:
    # A fresh key per test keeps the process-level sessions apart.
    fields = {
        "key": f"t{next(_counter)}",
        "display_name": "Test",
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "client_secret": Secret(SECRET),
        "login_base_url": LOGIN,
    }
    fields.update(kw)
    return ProviderConnection(**fields)


def make(graph: Handler, **kw) -> tuple[GraphClient, FakeTenant, Sleeps]:
    tenant = FakeTenant(graph)
    sleeps = Sleeps()
    client = GraphClient(
        connection(),
        transport=httpx.MockTransport(tenant),
        sleep=sleeps,
        rng=random.Random(1),
        bucket=TokenBucket(),
        **kw,
    )
    return client, tenant, sleeps


def get_item(client: GraphClient, contract_key: str, item_id: str) -> dict:
    """One item read alone, through the client's request path (the product reads items only
    in $batch)."""
    contract = client._contract(contract_key)
    return client._request(contract, client._url(contract, contract.relative_url(item_id)))


def routes(*steps: Handler | httpx.Response) -> Handler:
    """A handler answering the Graph requests in order (the last answer repeats)."""
    answers = list(steps)

    def handle(request: httpx.Request) -> httpx.Response:
        step = answers.pop(0) if len(answers) > 1 else answers[0]
        return step(request) if callable(step) else step

    return handle


# --- paging -----------------------------------------------------------------------------------


def test_pages_follow_next_link_verbatim_and_stream():
    link = f"{SETTINGS}?$select=id&$top=2&$skiptoken=Q2xpZW50LTE%3d"
    client, tenant, _ = make(routes(page([{"id": "a"}, {"id": "b"}], link), page([{"id": "c"}])))
    pages = client.pages("settings_catalog")
    assert next(pages) == [{"id": "a"}, {"id": "b"}]
    assert len(tenant.graph_requests()) == 1  # the second page is not read before it is needed
    assert next(pages) == [{"id": "c"}]
    sent = tenant.graph_requests()
    assert str(sent[1].url) == link
    first = urlsplit(str(sent[0].url))
    assert first.path == "/beta/deviceManagement/configurationPolicies"
    assert parse_qs(first.query)["$top"] == ["100"]
    assert client.stats.pages == 2 and client.stats.requests == 2


def test_requests_carry_bearer_token_and_fresh_client_request_ids():
    link = f"{SETTINGS}?$skiptoken=x"
    client, tenant, _ = make(routes(page([{"id": "a"}], link), page([])))
    list(client.pages("settings_catalog"))
    sent = tenant.graph_requests()
    assert all(r.headers["Authorization"].startswith("Bearer ") for r in sent)
    ids = {r.headers["client-request-id"] for r in sent}
    assert len(ids) == 2


@pytest.mark.parametrize(
    "link",
    [
        "https://evil.example.com/beta/deviceManagement/configurationPolicies?$skiptoken=x",
        "http://graph.microsoft.com/beta/deviceManagement/configurationPolicies?$skiptoken=x",
        "https://graph.microsoft.com.evil.example/beta/deviceManagement/configurationPolicies",
    ],
)
def test_foreign_next_link_is_refused_without_sending_anything(link):
    client, tenant, _ = make(routes(page([{"id": "a"}], link), page([{"id": "leak"}])))
    pages = client.pages("settings_catalog")
    assert next(pages) == [{"id": "a"}]
    with pytest.raises(GraphError) as err:
        next(pages)
    assert err.value.reason_code == reasons.PROVIDER_BAD_RESPONSE
    assert len(tenant.graph_requests()) == 1
    assert not any(
        urlsplit(str(r.url)).hostname != "graph.microsoft.com" for r in tenant.graph_requests()
    )


def test_next_link_to_a_path_outside_the_contract_is_refused():
    link = f"{GRAPH}/beta/users?$skiptoken=x"
    client, tenant, _ = make(routes(page([], link), page([])))
    with pytest.raises(GraphError, match="matches no path"):
        list(client.pages("settings_catalog"))
    assert len(tenant.graph_requests()) == 1


def test_unknown_contract_is_refused():
    client, tenant, _ = make(routes(page([])))
    with pytest.raises(ValueError):
        list(client.pages("mailboxes"))
    assert tenant.requests == []


def test_get_reads_one_item_and_probe_sends_one_minimal_request():
    client, tenant, _ = make(routes(httpx.Response(200, json={"id": "p1", "name": "x"})))
    assert get_item(client, "policy_sets.item", "p1")["id"] == "p1"
    client.probe("settings_catalog")
    probe = urlsplit(str(tenant.graph_requests()[-1].url))
    assert probe.path == "/beta/deviceManagement/configurationPolicies"
    assert parse_qs(probe.query) == {"$select": ["id"], "$top": ["1"]}


# --- retries --------------------------------------------------------------------------------


def test_429_storm_honours_fractional_retry_after():
    throttled = graph_error(429, "TooManyRequests", "Too many requests", {"Retry-After": "0.2"})
    client, tenant, sleeps = make(routes(*([throttled] * 5), page([{"id": "a"}])))
    assert list(client.pages("settings_catalog")) == [[{"id": "a"}]]
    assert sleeps == [pytest.approx(0.2)] * 5
    assert client.stats.throttled_retries == 5 and client.stats.requests == 6


def test_persistent_429_gives_up_as_throttled():
    throttled = graph_error(429, "TooManyRequests", "Too many", {"Retry-After": "0.01"})
    client, tenant, _ = make(routes(throttled))
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reasons.PROVIDER_THROTTLED
    assert err.value.status == 429 and err.value.contract_key == "settings_catalog"
    assert len(tenant.graph_requests()) == 8


def test_retry_after_http_date_and_bad_values():
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10
    assert retry_after_seconds("0.2") == pytest.approx(0.2)
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("-3") == 0


def test_503_then_success_backs_off_with_jitter():
    unavailable = httpx.Response(503, text="Service Unavailable")
    client, _, sleeps = make(routes(unavailable, unavailable, page([{"id": "a"}])))
    assert list(client.pages("settings_catalog")) == [[{"id": "a"}]]
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0
    assert client.stats.retries == 2 and client.stats.throttled_retries == 0


def test_persistent_504_gives_up_as_unavailable():
    client, _, _ = make(routes(httpx.Response(504)))
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reasons.PROVIDER_UNAVAILABLE


GATEWAY_PAGE = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center></body></html>"
)


def html_response(status: int, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(
        status, text=GATEWAY_PAGE, headers={"Content-Type": "text/html", **(headers or {})}
    )


def test_502_with_an_html_body_is_retried_and_the_read_succeeds():
    client, tenant, sleeps = make(
        routes(html_response(502), html_response(502, {"Retry-After": "1.5"}), page([{"id": "a"}]))
    )
    assert list(client.pages("settings_catalog")) == [[{"id": "a"}]]
    assert len(tenant.graph_requests()) == 3
    assert 0.25 <= sleeps[0] <= 0.5  # jittered backoff, then the gateway's own Retry-After
    assert sleeps[1] == pytest.approx(1.5)
    assert client.stats.retries == 2 and client.stats.throttled_retries == 0


def test_persistent_502_gives_up_as_unavailable():
    client, tenant, _ = make(routes(html_response(502)))
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reasons.PROVIDER_UNAVAILABLE and err.value.status == 502
    assert len(tenant.graph_requests()) == 8


@pytest.mark.parametrize(
    ("status", "reason"),
    [(400, reasons.PROVIDER_BAD_RESPONSE), (500, reasons.PROVIDER_UNAVAILABLE)],
)
def test_html_body_on_a_status_that_is_not_retried_fails_once_with_a_one_line_error(status, reason):
    client, tenant, sleeps = make(routes(html_response(status), page([{"id": "a"}])))
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reason and err.value.status == status
    assert err.value.message.startswith(f"settings_catalog: HTTP {status}")
    assert "\n" not in err.value.message and "<html>" not in err.value.message
    assert len(tenant.graph_requests()) == 1 and sleeps == []


def test_timeout_is_retried():
    calls = []

    def flaky(request):
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ReadTimeout("timed out", request=request)
        return page([{"id": "a"}])

    client, _, sleeps = make(flaky)
    assert list(client.pages("settings_catalog")) == [[{"id": "a"}]]
    assert len(calls) == 2 and len(sleeps) == 1


def test_persistent_timeouts_become_unavailable():
    def slow(request):
        raise httpx.ConnectTimeout("timed out", request=request)

    client, _, _ = make(slow)
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reasons.PROVIDER_UNAVAILABLE


def test_malformed_page_is_retried_then_accepted():
    truncated = httpx.Response(200, text='{"value": [{"id": "a"}, {"id"')
    client, tenant, _ = make(routes(truncated, page([{"id": "a"}])))
    assert list(client.pages("settings_catalog")) == [[{"id": "a"}]]
    assert len(tenant.graph_requests()) == 2


def test_persistently_malformed_page_is_a_bad_response():
    client, tenant, _ = make(routes(httpx.Response(200, text="<html>oops</html>")))
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reasons.PROVIDER_BAD_RESPONSE
    assert len(tenant.graph_requests()) == 3


def test_401_mid_paging_refreshes_the_token_once():
    link = f"{SETTINGS}?$skiptoken=p2"
    expired = graph_error(401, "InvalidAuthenticationToken", "Access token has expired.")
    client, tenant, _ = make(routes(page([{"id": "a"}], link), expired, page([{"id": "b"}])))
    assert list(client.pages("settings_catalog")) == [[{"id": "a"}], [{"id": "b"}]]
    sent = tenant.graph_requests()
    assert sent[1].headers["Authorization"] != sent[2].headers["Authorization"]
    assert tenant.tokens_issued == 2 and client.stats.token_requests == 2


def test_401_after_refresh_is_auth_failed():
    expired = graph_error(401, "InvalidAuthenticationToken", "Access token validation failure.")
    client, tenant, _ = make(routes(expired))
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reasons.PROVIDER_AUTH_FAILED
    assert len(tenant.graph_requests()) == 2


def test_the_resend_after_a_401_is_a_paced_retry_with_its_own_client_request_id():
    clock = FakeClock()
    bucket = TokenBucket(clock=clock)
    expired = graph_error(401, "InvalidAuthenticationToken", "Access token has expired.")
    tenant = FakeTenant(routes(expired, page([{"id": "a"}])))
    client = GraphClient(
        connection(), transport=httpx.MockTransport(tenant), sleep=clock.sleep, bucket=bucket
    )
    assert list(client.pages("settings_catalog")) == [[{"id": "a"}]]
    refused, resent = tenant.graph_requests()
    assert refused.headers["client-request-id"] != resent.headers["client-request-id"]
    assert client.stats.requests == 2 and client.stats.retries == 1
    assert bucket.reserve(998) == 0  # both requests took a unit
    assert bucket.reserve(1) > 0


def test_the_token_is_refreshed_once_per_request_across_its_retries():
    expired = graph_error(401, "InvalidAuthenticationToken", "Access token has expired.")
    throttled = graph_error(429, "TooManyRequests", "Too many", {"Retry-After": "0"})
    client, tenant, _ = make(routes(expired, throttled, expired, page([])))
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reasons.PROVIDER_AUTH_FAILED
    assert len(tenant.graph_requests()) == 3 and tenant.tokens_issued == 2


# --- errors -----------------------------------------------------------------------------------

INTUNE_403 = json.dumps(
    {
        "_version": 3,
        "Message": "Application is not authorized to perform this operation. Application must "
        "have one of the following scopes: DeviceManagementConfiguration.Read.All, "
        "DeviceManagementConfiguration.ReadWrite.All - Operation ID (for customer support): "
        "00000000-0000-0000-0000-000000000000 - Activity ID: 63425837 - Url: "
        "https://fef.msub02.manage.microsoft.com/DeviceConfiguration/deviceManagement",
        "CustomApiErrorPhrase": "",
        "RetryAfter": None,
        "ErrorSourceService": "",
        "HttpHeaders": "{}",
    },
    indent=2,
)


def test_403_intune_shape_names_the_missing_scopes():
    client, _, _ = make(routes(graph_error(403, "Forbidden", INTUNE_403)))
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reasons.PROVIDER_PERMISSION_DENIED
    assert "DeviceManagementConfiguration.Read.All" in err.value.message
    assert "DeviceManagementConfiguration.ReadWrite.All" in err.value.message
    assert err.value.status == 403


def test_403_directory_shape_is_permission_denied_naming_the_contract_permission():
    denied = graph_error(
        403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
    )
    client, _, _ = make(routes(denied))
    with pytest.raises(GraphError) as err:
        list(client.delta("groups_delta", None))
    assert err.value.reason_code == reasons.PROVIDER_PERMISSION_DENIED
    assert "GroupMember.Read.All" in err.value.message
    assert "Authorization_RequestDenied" in err.value.message


def test_403_consent_is_consent_missing():
    denied = graph_error(
        403,
        "Authorization_RequestDenied",
        "AADSTS65001: The user or administrator has not consented to use the application.",
    )
    client, _, _ = make(routes(denied))
    with pytest.raises(GraphError) as err:
        client.probe("settings_catalog")
    assert err.value.reason_code == reasons.PROVIDER_CONSENT_MISSING


def test_404_is_not_found_with_request_ids():
    missing = graph_error(404, "ResourceNotFound", "Resource not found", {"request-id": "rq-9"})
    client, tenant, _ = make(routes(missing))
    with pytest.raises(GraphError) as err:
        get_item(client, "powershell_scripts.item", "abc")
    assert err.value.reason_code == reasons.PROVIDER_NOT_FOUND
    assert err.value.request_id == "rq-9"
    assert err.value.client_request_id == tenant.graph_requests()[0].headers["client-request-id"]


# --- auth ---------------------------------------------------------------------------------


def test_token_claims_and_login_host_mapped_to_loopback():
    client, tenant, _ = make(routes(page([])))
    tenant.roles = ("DeviceManagementConfiguration.Read.All",)
    claims = client.token_claims()
    assert claims["roles"] == ["DeviceManagementConfiguration.Read.All"]
    login = [str(r.url) for r in tenant.requests]
    assert login[0].startswith(f"{LOGIN}/{TENANT}/v2.0/.well-known/openid-configuration")
    assert login[1] == f"{LOGIN}/{TENANT}/oauth2/v2.0/token"
    form = parse_qs(tenant.token_posts[0].content.decode())
    assert form["scope"] == ["https://graph.microsoft.com/.default"]
    assert form["grant_type"] == ["client_credentials"]


def test_token_is_cached_across_requests():
    client, tenant, _ = make(routes(page([])))
    for _ in range(3):
        list(client.pages("settings_catalog"))
    assert tenant.tokens_issued == 1 and client.stats.token_requests == 1


def test_invalid_secret_is_auth_failed_with_aadsts_code(caplog):
    caplog.set_level(logging.DEBUG)
    client, tenant, _ = make(routes(page([])))
    tenant.token_error = {
        "error": "invalid_client",
        "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret "
        "being sent in the request is the client secret value. Trace ID: 1 Correlation ID: 2",
        "error_codes": [7000215],
    }
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    assert err.value.reason_code == reasons.PROVIDER_AUTH_FAILED
    assert "AADSTS7000215" in err.value.message
    assert tenant.graph_requests() == []
    assert SECRET not in str(err.value) and SECRET not in repr(err.value.args)
    assert SECRET not in caplog.text


def test_consent_error_at_sign_in_is_consent_missing():
    client, tenant, _ = make(routes(page([])))
    tenant.token_error = {
        "error": "invalid_grant",
        "error_description": "AADSTS65001: The user or administrator has not consented.",
    }
    with pytest.raises(GraphError) as err:
        client.token_claims()
    assert err.value.reason_code == reasons.PROVIDER_CONSENT_MISSING


def test_logs_carry_ids_but_never_secret_or_token(caplog):
    caplog.set_level(logging.DEBUG)
    link = f"{SETTINGS}?$skiptoken=SECRET-SKIP-TOKEN"
    client, tenant, _ = make(routes(page([], link), graph_error(404, "NotFound", "gone")))
    with pytest.raises(GraphError) as err:
        list(client.pages("settings_catalog"))
    token = tenant.graph_requests()[0].headers["Authorization"].split()[1]
    graph_lines = [r.getMessage() for r in caplog.records if r.name == "atlas_dagster.graph"]
    assert len(graph_lines) == 2
    assert all("settings_catalog" in line and "client-request-id=" in line for line in graph_lines)
    assert "request-id=req-1" in graph_lines[0]
    for text in (caplog.text, str(err.value)):
        assert SECRET not in text and token not in text and "SECRET-SKIP-TOKEN" not in text


# --- delta ----------------------------------------------------------------------------------

GROUPS = f"{GRAPH}/v1.0/groups/delta"


def test_delta_streams_pages_and_splits_removed():
    next_link = f"{GROUPS}?$skiptoken=abc"
    delta_link = f"{GROUPS}?$deltatoken=xyz"
    first = page([{"id": "g1", "displayName": "A"}], next_link)
    last = httpx.Response(
        200,
        json={
            "value": [{"id": "g2", "@removed": {"reason": "deleted"}}, {"id": "g3"}],
            "@odata.deltaLink": delta_link,
        },
    )
    client, tenant, _ = make(routes(first, last))
    pages = list(client.delta("groups_delta", None))
    assert [p.items for p in pages] == [[{"id": "g1", "displayName": "A"}], [{"id": "g3"}]]
    assert pages[1].removed == [{"id": "g2", "@removed": {"reason": "deleted"}}]
    assert [p.delta_link for p in pages] == [None, delta_link]
    first_url = urlsplit(str(tenant.graph_requests()[0].url))
    assert first_url.path == "/v1.0/groups/delta" and "$select" in parse_qs(first_url.query)


def test_delta_resumes_from_the_stored_link():
    stored = f"{GROUPS}?$deltatoken=old"
    done = httpx.Response(200, json={"value": [], "@odata.deltaLink": f"{GROUPS}?$deltatoken=n"})
    client, tenant, _ = make(routes(done))
    assert [p.delta_link for p in client.delta("groups_delta", stored)] == [
        f"{GROUPS}?$deltatoken=n"
    ]
    assert str(tenant.graph_requests()[0].url) == stored


def test_expired_delta_link_raises_delta_expired():
    gone = httpx.Response(410, text="Gone")
    client, _, _ = make(routes(gone))
    with pytest.raises(DeltaExpired) as err:
        list(client.delta("groups_delta", f"{GROUPS}?$deltatoken=old"))
    assert err.value.status == 410


def test_foreign_stored_delta_link_is_refused():
    client, tenant, _ = make(routes(page([])))
    with pytest.raises(GraphError):
        list(client.delta("groups_delta", "https://evil.example/v1.0/groups/delta?$deltatoken=x"))
    assert tenant.requests == []


# --- $batch -----------------------------------------------------------------------------------


def batch_handler(answer: Callable[[dict, int], dict]) -> tuple[Handler, list[list[dict]]]:
    """A $batch endpoint; ``answer(sub_request, call_number)`` gives each sub-response."""
    seen: list[list[dict]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/beta/$batch"
        subs = json.loads(request.content)["requests"]
        seen.append(subs)
        responses = [{"id": s["id"], **answer(s, len(seen))} for s in subs]
        return httpx.Response(200, json={"responses": list(reversed(responses))})

    return handle, seen


def test_batch_of_45_ids_retries_a_throttled_sub_request_without_holding_back_the_rest():
    def answer(sub, call):
        item = sub["url"].split("/")[3]
        if item == "s7" and call == 1:
            return {
                "status": 429,
                "headers": {"Retry-After": "0.3"},
                "body": {"error": {"code": "TooManyRequests", "message": "throttled"}},
            }
        return {"status": 200, "headers": {}, "body": {"id": item, "scriptContent": "ZWNobw=="}}

    handler, seen = batch_handler(answer)
    client, _, sleeps = make(handler)
    ids = [f"s{n}" for n in range(45)]
    results = dict(client.read_details("powershell_scripts.item", ids))
    assert set(results) == set(ids)
    assert results["s7"] == {"id": "s7", "scriptContent": "ZWNobw=="}
    # The reads not throttled go on at once; the throttled one waits out its Retry-After alone.
    assert [len(s) for s in seen] == [20, 19, 6, 1]
    assert [s["url"] for s in seen[3]] == ["/deviceManagement/deviceManagementScripts/s7"]
    # Its Retry-After, less what passed while the other reads went on.
    assert len(sleeps) == 1 and 0.2 < sleeps[0] <= 0.3
    assert client.stats.requests == 4
    assert client.stats.request_units == 46  # 45 reads + the retried one; envelopes are free
    assert client.stats.throttled_retries == 1


def test_batch_sub_request_502_with_an_html_body_is_retried():
    def answer(sub, call):
        item = sub["url"].split("/")[3]
        if item == "s1" and call == 1:
            return {"status": 502, "headers": {"Content-Type": "text/html"}, "body": GATEWAY_PAGE}
        return {"status": 200, "headers": {}, "body": {"id": item, "scriptContent": "ZWNobw=="}}

    handler, seen = batch_handler(answer)
    client, _, sleeps = make(handler)
    results = dict(client.read_details("powershell_scripts.item", ["s0", "s1"]))
    assert results["s1"] == {"id": "s1", "scriptContent": "ZWNobw=="}
    assert [[s["url"].split("/")[3] for s in batch] for batch in seen] == [["s0", "s1"], ["s1"]]
    assert len(sleeps) == 1 and client.stats.retries == 1


def test_batch_collection_follows_each_sub_request_next_link():
    settings = {f"p{n}": [{"id": f"p{n}-s{i}"} for i in range(60)] for n in range(3)}

    def answer(sub, _call):
        url = urlsplit(sub["url"])
        item = url.path.split("/")[3]
        skip = int(parse_qs(url.query).get("$skip", ["0"])[0])
        chunk = settings[item][skip : skip + 25]
        body = {"value": chunk}
        if skip + 25 < len(settings[item]):
            body["@odata.nextLink"] = (
                f"{SETTINGS}/{item}/settings?$expand=settingDefinitions&$top=25&$skip={skip + 25}"
            )
        return {"status": 200, "headers": {}, "body": body}

    handler, seen = batch_handler(answer)
    client, _, _ = make(handler)
    results = dict(client.read_details("settings_catalog.settings", list(settings)))
    assert results == settings
    assert len(seen) == 3  # three pages of 25 per item, all items in each batch
    assert seen[1][0]["url"].startswith("/deviceManagement/configurationPolicies/p")
    assert client.stats.pages == 9


def test_batch_sub_request_next_link_to_foreign_host_is_refused():
    def answer(sub, _call):
        return {
            "status": 200,
            "body": {
                "value": [],
                "@odata.nextLink": "https://evil.example/beta/deviceManagement/configurationPolicies/p/settings",
            },
        }

    handler, seen = batch_handler(answer)
    client, _, _ = make(handler)
    with pytest.raises(GraphError) as err:
        list(client.read_details("settings_catalog.settings", ["p"]))
    assert err.value.reason_code == reasons.PROVIDER_BAD_RESPONSE
    assert len(seen) == 1


def test_batch_sub_request_403_names_the_contract_permission_like_a_plain_request():
    def answer(sub, _call):
        return {
            "status": 403,
            "headers": {"request-id": "rq-7"},
            "body": {"error": {"code": "Forbidden", "message": "Access denied."}},
        }

    handler, _ = batch_handler(answer)
    client, _, _ = make(handler)
    with pytest.raises(GraphError) as err:
        list(client.read_details("powershell_scripts.item", ["s1"]))
    assert err.value.reason_code == reasons.PROVIDER_PERMISSION_DENIED
    assert "requires DeviceManagementConfiguration.Read.All" in err.value.message
    assert "item s1" in err.value.message and err.value.request_id == "rq-7"


def test_batch_item_that_finally_fails_raises():
    handler, _ = batch_handler(
        lambda sub, _c: {"status": 404, "body": {"error": {"code": "NotFound", "message": "no"}}}
    )
    client, _, _ = make(handler)
    with pytest.raises(GraphError) as err:
        list(client.read_details("powershell_scripts.item", ["gone"]))
    assert err.value.reason_code == reasons.PROVIDER_NOT_FOUND


def test_read_policies_merges_details_and_assignments():
    intents = f"{GRAPH}/beta/deviceManagement/intents"

    def graph(request):
        if request.method == "GET":
            return page([{"id": "i1", "displayName": "Firewall"}, {"id": "i2"}])
        subs = json.loads(request.content)["requests"]
        responses = []
        for s in subs:
            _, _, _, item, kind = s["url"].split("?")[0].split("/")
            responses.append(
                {"id": s["id"], "status": 200, "body": {"value": [{"id": f"{item}-{kind}"}]}}
            )
        return httpx.Response(200, json={"responses": responses})

    client, tenant, _ = make(graph)
    objects = list(client.read_policies("endpoint_security_intents"))
    assert objects[0] == {
        "id": "i1",
        "displayName": "Firewall",
        "settings": [{"id": "i1-settings"}],
        "assignments": [{"id": "i1-assignments"}],
    }
    assert str(tenant.graph_requests()[0].url).startswith(intents)


def test_read_policies_merge_detail_adds_fields():
    def graph(request):
        if request.method == "GET":
            return page([{"id": "ps1", "displayName": "Script"}])
        return httpx.Response(
            200,
            json={
                "responses": [
                    {
                        "id": "1",
                        "status": 200,
                        "body": {
                            "@odata.context": "x",
                            "id": "ps1",
                            "scriptContent": "V3JpdGUtSG9zdA==",
                        },
                    }
                ]
            },
        )

    client, _, _ = make(graph)
    assert list(client.read_policies("powershell_scripts")) == [
        {"id": "ps1", "displayName": "Script", "scriptContent": "V3JpdGUtSG9zdA=="}
    ]


def test_read_policies_detail_failure_names_the_policy_contract():
    def graph(request):
        if request.method == "GET":
            return page([{"id": "ps1"}])
        return httpx.Response(
            200,
            json={
                "responses": [
                    {
                        "id": "1",
                        "status": 403,
                        "body": {"error": {"code": "Forbidden", "message": INTUNE_403}},
                    }
                ]
            },
        )

    client, _, _ = make(graph)
    with pytest.raises(GraphError) as err:
        list(client.read_policies("powershell_scripts"))
    assert err.value.contract_key == "powershell_scripts"
    assert err.value.reason_code == reasons.PROVIDER_PERMISSION_DENIED


# --- pacing -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_token_bucket_lets_a_burst_of_1000_through_then_paces():
    clock = FakeClock()
    bucket = TokenBucket(clock=clock)
    assert all(bucket.reserve() == 0 for _ in range(1000))
    assert bucket.reserve() == pytest.approx(1 / 50)
    clock.now += 20
    assert bucket.reserve() == 0


def test_client_is_not_slowed_for_1000_requests_and_waits_on_the_1001st():
    clock = FakeClock()
    tenant = FakeTenant(routes(page([])))
    sleeps = Sleeps()

    def sleep(seconds):
        sleeps.append(seconds)
        clock.sleep(seconds)

    client = GraphClient(
        connection(),
        transport=httpx.MockTransport(tenant),
        sleep=sleep,
        bucket=TokenBucket(clock=clock),
    )
    for _ in range(1000):
        client.probe("settings_catalog")
    assert sleeps == []
    client.probe("settings_catalog")
    assert sleeps == [pytest.approx(0.02)]


def test_batch_sub_requests_count_against_the_bucket():
    clock = FakeClock()
    bucket = TokenBucket(clock=clock)
    handler, _ = batch_handler(lambda s, c: {"status": 200, "body": {"id": "x"}})
    tenant = FakeTenant(handler)
    client = GraphClient(
        connection(), transport=httpx.MockTransport(tenant), sleep=clock.sleep, bucket=bucket
    )
    list(client.read_details("powershell_scripts.item", [f"i{n}" for n in range(40)]))
    assert bucket.reserve(960) == 0
    assert bucket.reserve(1) > 0


# --- certificate, sharing and the resource --------------------------------------------------


def test_certificate_credential_signs_a_client_assertion(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path = tmp_path / "app.pem"
    key_path.write_bytes(pem)
    tenant = FakeTenant(routes(page([])))
    conn = connection(
        client_secret=None,
        certificate=Certificate(private_key_path=str(key_path), thumbprint="AB" * 20),
    )
    client = GraphClient(conn, transport=httpx.MockTransport(tenant), bucket=TokenBucket())
    assert client.token_claims()["tid"] == TENANT
    form = parse_qs(tenant.token_posts[0].content.decode())
    assert form["client_assertion_type"] == [
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    ]
    assert "client_secret" not in form


def test_clients_of_one_connection_share_the_signed_in_session():
    tenant = FakeTenant(routes(page([])))
    transport = httpx.MockTransport(tenant)
    conn = connection()
    first = GraphClient(conn, transport=transport, bucket=TokenBucket())
    second = GraphClient(conn, transport=transport, bucket=TokenBucket())
    first.probe("settings_catalog")
    second.probe("settings_catalog")
    assert tenant.tokens_issued == 1
    assert first.stats.token_requests == 1 and second.stats.token_requests == 0


def test_close_releases_the_session_and_a_later_request_signs_in_again():
    client, tenant, _ = make(routes(page([])))
    client.probe("settings_catalog")
    client.close()
    client.probe("settings_catalog")
    assert tenant.tokens_issued == 2


def test_a_client_over_another_transport_signs_in_through_that_transport():
    conn = connection()
    old, new = FakeTenant(routes(page([]))), FakeTenant(routes(page([])))
    first = GraphClient(conn, transport=httpx.MockTransport(old), bucket=TokenBucket())
    first.probe("settings_catalog")
    second = GraphClient(conn, transport=httpx.MockTransport(new), bucket=TokenBucket())
    second.probe("settings_catalog")
    first.probe("settings_catalog")
    assert old.tokens_issued == 1 and new.tokens_issued == 1
    assert len(old.graph_requests()) == 2 and len(new.graph_requests()) == 1


def test_client_for_caches_per_connection_and_the_resource_hands_it_out():
    conn = connection()
    assert client_for(conn) is client_for(conn)
    assert client_for(conn) is not client_for(connection())
    assert GraphClientResource().client(conn) is client_for(conn)


def test_doubly_nested_intune_error_is_unwrapped():
    inner = json.dumps({"ErrorCode": "Forbidden", "Message": INTUNE_403})
    code, message = parse_error_body({"error": {"code": "UnknownError", "message": inner}})
    assert code == "Forbidden"
    assert message.startswith("Application is not authorized")
    assert "Operation ID" not in message
