"""Entra sign-in for the GraphClient: msal's confidential client over an httpx-based transport.

msal only accepts an https authority on a known host, yet tests and the simulator serve the login
endpoints on loopback http. So msal always sees ``https://login.microsoftonline.com/{tenant}`` and
the :class:`MsalHttpClient` it is given rewrites that prefix to the connection's
``login_base_url`` before sending through the same httpx transport the Graph requests use.

Pure helpers here (:func:`auth_error`, :func:`decode_jwt_payload`) never put a secret or a token
into a message.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import msal

from atlas_dagster import reasons
from atlas_dagster.config import ProviderConnection
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
        # The httpx client belongs to the GraphClient's session, which closes it.
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
        credential = connection.client_secret.reveal()
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
