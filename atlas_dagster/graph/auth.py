"""Entra sign-in for the GraphClient: msal's confidential client, as an ``httpx.Auth``.

msal only accepts an https authority on a known host, yet tests and the simulator serve the login
endpoints on loopback http. So msal always sees ``https://login.microsoftonline.com/{tenant}`` and
the :class:`MsalHttpClient` it is given rewrites that prefix to the connection's
``login_base_url`` before sending through the transport the Graph requests use.

One :class:`SignIn` per connection lives at process level, so that Dagster, which builds
resources on every sensor tick, never pays for sign-in twice; its msal token cache serves every
client of the connection. :class:`EntraAuth` puts the token on a request and takes a new one once
when Graph refuses it.

Pure helpers here (:func:`auth_error`, :func:`decode_jwt_payload`) never put a secret or a token
into a message.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import msal

from atlas_dagster import reasons
from atlas_dagster.config import ProviderConnection
from atlas_dagster.graph.errors import collapse_whitespace
from atlas_dagster.graph.transport import http_client
from atlas_dagster.reasons import GraphError

ENTRA_LOGIN = "https://login.microsoftonline.com"
_AADSTS = re.compile(r"AADSTS\d+")
# Entra appends trace/correlation ids and timestamps to its descriptions; the first sentence
# carries the meaning.
_DESCRIPTION_TAIL = re.compile(r"\s*(Trace ID|Correlation ID|Timestamp):.*", re.DOTALL)
CONSENT_CODES = ("AADSTS65001", "AADSTS650057", "AADSTS90094", "AADSTS90008")


class MsalHttpClient:
    """The ``http_client`` protocol msal expects (``get``/``post`` returning objects with
    ``status_code``, ``text``, ``headers`` and ``raise_for_status``), backed by httpx."""

    def __init__(self, http: httpx.Client, login_base_url: str):
        self._http = http
        self._login = login_base_url.rstrip("/")

    def map_url(self, url: str) -> str:
        if url.startswith(ENTRA_LOGIN):
            return self._login + url[len(ENTRA_LOGIN) :]
        return url

    def get(self, url: str, params: Any = None, headers: Any = None, **kwargs: Any):
        return self._http.get(
            self.map_url(url), params=params, headers=_clean(headers), timeout=_timeout(kwargs)
        )

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None, **kw: Any):
        return self._http.post(
            self.map_url(url),
            params=params,
            data=_form(data),
            headers=_clean(headers),
            timeout=_timeout(kw),
        )

    def close(self) -> None:
        # The httpx client belongs to the SignIn, which closes it.
        return None


def _form(data: Any) -> Any:
    # msal hands the certificate's client assertion over as bytes; httpx would form-encode
    # bytes as their repr ("b'eyJ…'"), which Entra rejects as a malformed JWT.
    if isinstance(data, Mapping):
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in data.items()}
    return data


def _clean(headers: Mapping[str, Any] | None) -> dict[str, str]:
    return {k: str(v) for k, v in (headers or {}).items() if v is not None}


def _timeout(kwargs: Mapping[str, Any]) -> Any:
    return kwargs.get("timeout", httpx.USE_CLIENT_DEFAULT)


def build_app(
    connection: ProviderConnection, http_client: MsalHttpClient
) -> msal.ConfidentialClientApplication:
    """One msal application per connection; its in-memory token cache lives as long as it."""
    if connection.tenant_id is None or connection.client_id is None:
        raise GraphError(
            reasons.PROVIDER_CONNECTION_INVALID,
            f"connection {connection.key} has no tenant_id or client_id",
        )
    credential: Any
    if connection.certificate is not None:
        try:
            key = Path(connection.certificate.private_key_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise GraphError(
                reasons.PROVIDER_CONNECTION_INVALID,
                f"connection {connection.key}: cannot read the certificate key ({exc.strerror})",
            ) from None
        credential = {"private_key": key, "thumbprint": connection.certificate.thumbprint}
    elif connection.client_secret is not None:
        credential = connection.client_secret.get_secret_value()
    else:
        raise GraphError(
            reasons.PROVIDER_CONNECTION_INVALID,
            f"connection {connection.key} has neither a client secret nor a certificate",
        )
    try:
        return msal.ConfidentialClientApplication(
            connection.client_id,
            client_credential=credential,
            authority=f"{ENTRA_LOGIN}/{connection.tenant_id}",
            http_client=http_client,
            token_cache=msal.TokenCache(),
            # The login host is configured; asking Entra's central discovery which aliases it
            # has would be one more call to a host that tests and the simulator replace.
            instance_discovery=False,
        )
    except ValueError as exc:
        # msal raises ValueError for an unknown tenant (OIDC discovery) or a bad key; its text
        # may quote Entra's response, never the credential.
        raise GraphError(
            reasons.PROVIDER_AUTH_FAILED,
            f"sign-in to tenant {connection.tenant_id} failed: {_summarise(str(exc))}",
        ) from None


def auth_error(result: Mapping[str, Any], tenant_id: str | None) -> GraphError:
    """Map a failed msal token result to a GraphError naming Entra's AADSTS code."""
    description = str(result.get("error_description") or result.get("error") or "unknown error")
    summary = _summarise(description)
    code = f"{result.get('error')}: " if result.get("error") and "AADSTS" not in summary else ""
    reason = (
        reasons.PROVIDER_CONSENT_MISSING
        if any(c in description for c in CONSENT_CODES) or "consent" in description.lower()
        else reasons.PROVIDER_AUTH_FAILED
    )
    return GraphError(reason, f"token request for tenant {tenant_id} failed: {code}{summary}")


def _summarise(text: str) -> str:
    first = _DESCRIPTION_TAIL.sub("", text).strip().splitlines()
    line = first[0] if first else text
    match = _AADSTS.search(text)
    if match and match.group(0) not in line:
        line = f"{match.group(0)}: {line}"
    return line[:500]


def decode_jwt_payload(token: str) -> dict[str, Any]:
    """The claims of a JWT, without verifying its signature (Graph verifies it; we only read
    ``roles`` to explain permission gaps)."""
    try:
        payload = token.split(".")[1]
        padded = payload + "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (IndexError, ValueError) as exc:
        raise GraphError(
            reasons.PROVIDER_BAD_RESPONSE, f"the access token is not a JWT ({type(exc).__name__})"
        ) from None
    if not isinstance(claims, dict):
        raise GraphError(reasons.PROVIDER_BAD_RESPONSE, "the access token payload is not an object")
    return claims


# --- Signing in (process level) ---------------------------------------------------------------


class SignIn:
    """One connection's msal application, its token cache and the httpx client it signs in
    with."""

    def __init__(
        self, connection: ProviderConnection, transport: httpx.BaseTransport | None, timeout: float
    ):
        self.connection = connection
        self.transport = transport
        self._http = http_client(transport, timeout)
        self._msal_http = MsalHttpClient(self._http, connection.login_base_url)
        self._app: msal.ConfidentialClientApplication | None = None
        self._lock = threading.Lock()
        # A client's first requests go out from several threads at once: one asks Entra, the
        # others wait and find the token in the cache.
        self._token_lock = threading.Lock()

    def _application(self) -> msal.ConfidentialClientApplication:
        # Building the app runs OIDC discovery (network), so it waits until a token is needed.
        with self._lock:
            if self._app is None:
                self._app = build_app(self.connection, self._msal_http)
            return self._app

    def token(self, scope: str, *, force: bool = False) -> tuple[str, bool]:
        """An access token for ``scope`` and whether Entra issued it just now (rather than
        msal's cache). ``force`` drops the cached token first."""
        tenant_id = self.connection.tenant_id
        try:
            app = self._application()
            with self._token_lock:
                if force:
                    # acquire_token_for_client would hand back its cached token; Graph rejected it.
                    cache = app.token_cache
                    for entry in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
                        cache.remove_at(entry)
                result = app.acquire_token_for_client(scopes=[scope])
        except httpx.HTTPError as exc:
            raise GraphError(
                reasons.PROVIDER_UNAVAILABLE,
                f"token request for tenant {tenant_id} failed: {type(exc).__name__}",
            ) from None
        except msal.exceptions.MsalServiceError as exc:
            raise GraphError(
                reasons.PROVIDER_UNAVAILABLE,
                f"token endpoint of tenant {tenant_id} failed: "
                f"{collapse_whitespace(exc.args[0] if exc.args else type(exc).__name__)[:200]}",
            ) from None
        if not result or "access_token" not in result:
            raise auth_error(result or {}, tenant_id)
        return result["access_token"], result.get("token_source") == "identity_provider"

    def close(self) -> None:
        self._http.close()


# One entry per connection: a client with another transport for the same connection (a test's,
# a new simulator's) replaces the entry, so the registry never outgrows the config.
_sign_ins: dict[ProviderConnection, SignIn] = {}
_sign_ins_lock = threading.Lock()


def sign_in_for(
    connection: ProviderConnection, transport: httpx.BaseTransport | None, timeout: float
) -> SignIn:
    """The process's sign-in for a connection over ``transport`` (None: the network)."""
    with _sign_ins_lock:
        sign_in = _sign_ins.get(connection)
        if sign_in is None or sign_in.transport is not transport:
            sign_in = _sign_ins[connection] = SignIn(connection, transport, timeout)
        return sign_in


def sign_out(sign_in: SignIn) -> None:
    """Forget a sign-in and its tokens; the connection's next request signs in again."""
    with _sign_ins_lock:
        if _sign_ins.get(sign_in.connection) is sign_in:
            del _sign_ins[sign_in.connection]
    sign_in.close()


# --- The httpx.Auth ---------------------------------------------------------------------------


class Tokens(Protocol):
    def __call__(self, *, force: bool = False) -> str: ...


class EntraAuth(httpx.Auth):
    """Puts a bearer token on one Graph request and on each of its retries. When Graph answers
    401 to a token msal still holds (revoked, or expired early), the request is sent again with
    a new token, once per request however often it is retried; ``before_resend`` sees the
    refused response and the new request before it goes."""

    requires_request_body = True  # the resend carries the same body
    requires_response_body = True  # the refused response frees its connection before sign-in

    def __init__(
        self, tokens: Tokens, before_resend: Callable[[httpx.Request, httpx.Response], None]
    ):
        self._tokens = tokens
        self._before_resend = before_resend
        self._refreshed = False

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._tokens()}"
        response = yield request
        if response.status_code != 401 or self._refreshed:
            return
        self._refreshed = True
        resend = httpx.Request(
            request.method,
            request.url,
            headers=request.headers,
            content=request.content,
            extensions=request.extensions,
        )
        self._before_resend(resend, response)
        resend.headers["Authorization"] = f"Bearer {self._tokens(force=True)}"
        yield resend
