"""The Entra login endpoints the simulator answers, and the access tokens it issues.

Tokens are JWT-shaped (``header.payload.signature``, base64url) with the claims of an app-only
Graph token (``tid``, ``appid``, ``roles``, ``exp``, ``iat``, …). The signature is an HMAC under
a key the simulator keeps, so Graph endpoints can tell its tokens from forged ones; revocation
drops the token ids issued so far.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

ENTRA = "https://login.microsoftonline.com"
TOKEN_LIFETIME_S = 3599
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt_part(token: str, index: int) -> dict[str, Any] | None:
    try:
        value = json.loads(b64url_decode(token.split(".")[index]))
    except (IndexError, ValueError, binascii.Error):
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Answer:
    """A login response: status, JSON body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


def login_base(scheme: str, host: str) -> str:
    """The login origin to advertise in discovery documents. msal only accepts https endpoints,
    so a simulator reached over plain loopback http advertises Entra's own host, which clients
    that serve on loopback already rewrite to their configured login URL."""
    return f"{scheme}://{host}" if scheme == "https" else ENTRA


def entra_error(status: int, error: str, code: int, description: str) -> Answer:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return Answer(
        status,
        {
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {trace} "
            f"Correlation ID: {correlation} Timestamp: {now}",
            "error_codes": [code],
            "timestamp": now,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"{ENTRA}/error?code={code}",
        },
    )


class Authority:
    """One tenant's Entra: its app registration, certificates, and the tokens it issued."""

    def __init__(self, tenant_id: str, client_id: str, client_secret: str):
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.certificates: dict[str, float] = {}  # sha1 thumbprint (hex, lower) -> expires_at
        self._key = os.urandom(32)
        self._live: set[str] = set()

    # --- tokens --------------------------------------------------------------------------------

    def issue(self, roles: list[str], audience: str, credential_kind: str) -> str:
        now = int(time.time())
        token_id = b64url(os.urandom(16))
        claims = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME_S,
            "aio": b64url(os.urandom(24)),
            "app_displayname": "atlas-dagster (simulated)",
            "appid": self.client_id,
            "appidacr": "2" if credential_kind == "certificate" else "1",
            "idp": f"https://sts.windows.net/{self.tenant_id}/",
            "idtyp": "app",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.client_id)),
            "roles": sorted(roles),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, self.client_id)),
            "tid": self.tenant_id,
            "uti": token_id,
            "ver": "1.0",
        }
        header = {"typ": "JWT", "alg": "HS256", "kid": "simulator"}
        signing_input = (
            f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        )
        signature = hmac.new(self._key, signing_input.encode(), hashlib.sha256).digest()
        self._live.add(token_id)
        return f"{signing_input}.{b64url(signature)}"

    def validate(self, authorization: str | None) -> tuple[dict[str, Any] | None, str]:
        """The claims of a valid bearer token, or None and Graph's reason."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None, "Access token is empty."
        token = authorization[7:].strip()
        parts = token.split(".")
        claims = decode_jwt_part(token, 1)
        if len(parts) != 3 or claims is None:
            return None, "IDX14100: JWT is not well formed, there are no dots (.)."
        expected = hmac.new(self._key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(b64url(expected), parts[2]):
            return None, "Access token validation failure. Invalid signature."
        if claims.get("exp", 0) <= time.time():
            return None, "Lifetime validation failed, the token is expired."
        if claims.get("uti") not in self._live:
            return None, "Access token has been revoked."
        return claims, ""

    def revoke_all(self) -> None:
        self._live.clear()

    # --- endpoints -----------------------------------------------------------------------------

    def instance_discovery(self, scheme: str, host: str, query: str) -> Answer:
        login = login_base(scheme, host)
        endpoint = (parse_qs(query).get("authorization_endpoint") or [""])[0]
        tenant = (urlsplit(endpoint).path.strip("/").split("/") or ["common"])[0] or "common"
        aliases = ["login.microsoftonline.com", "login.windows.net", "login.microsoft.com"]
        return Answer(
            200,
            {
                "tenant_discovery_endpoint": f"{login}/{tenant}/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [
                    {
                        "preferred_network": "login.microsoftonline.com",
                        "preferred_cache": "login.windows.net",
                        "aliases": aliases,
                    }
                ],
            },
        )

    def openid_configuration(self, scheme: str, host: str, tenant: str) -> Answer:
        if tenant.lower() != self.tenant_id:
            return entra_error(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                "and are signing into the correct cloud.",
            )
        base = f"{login_base(scheme, host)}/{self.tenant_id}"
        return Answer(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid", "ver"],
                "kerberos_endpoint": f"{base}/kerberos",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            },
        )

    def token(self, tenant: str, form: dict[str, str], roles: list[str]) -> Answer:
        """The client-credentials grant, with a secret or a certificate's client assertion."""
        if tenant.lower() != self.tenant_id:
            return entra_error(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                "and are signing into the correct cloud.",
            )
        if form.get("grant_type") != "client_credentials":
            return entra_error(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{form.get('grant_type', '')}'.",
            )
        client_id = form.get("client_id", "")
        if client_id.lower() != self.client_id:
            return entra_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{self.tenant_id}'. This can happen if the application has not been installed "
                "by the administrator of the tenant or consented to by any user in the tenant. "
                "You may have sent your authentication request to the wrong tenant.",
            )
        scopes = form.get("scope", "").split()
        resources = [s for s in scopes if s not in ("openid", "profile", "offline_access")]
        if len(resources) != 1 or not resources[0].endswith("/.default"):
            return entra_error(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {' '.join(resources) or '(none)'} is not valid. "
                "Client credential flows must have a scope value with /.default suffixed to the "
                "resource identifier (application ID URI).",
            )
        if "client_secret" in form:
            if not hmac.compare_digest(form["client_secret"], self.client_secret):
                return entra_error(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request "
                    f"is the client secret value, not the client secret ID, for a secret added "
                    f"to app '{self.client_id}'.",
                )
            kind = "secret"
        elif form.get("client_assertion_type") == ASSERTION_TYPE and "client_assertion" in form:
            refused = self._check_assertion(form["client_assertion"])
            if refused is not None:
                return refused
            kind = "certificate"
        else:
            return entra_error(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
        audience = resources[0].removesuffix("/.default")
        return Answer(
            200,
            {
                "token_type": "Bearer",
                "expires_in": TOKEN_LIFETIME_S,
                "ext_expires_in": TOKEN_LIFETIME_S,
                "access_token": self.issue(roles, audience, kind),
            },
        )

    def _check_assertion(self, assertion: str) -> Answer | None:
        """Accept a client assertion whose header names a registered, unexpired certificate
        (``x5t`` is its base64url SHA-1 thumbprint, ``x5t#S256`` the SHA-256 one). The signature is
        not checked: the simulator knows thumbprints, not public keys."""
        header = decode_jwt_part(assertion, 0)
        claims = decode_jwt_part(assertion, 1)
        if header is None or claims is None:
            return entra_error(401, "invalid_client", 50027, "JWT token is invalid or malformed.")
        thumbprint, expires_at = "", None
        for name in ("x5t", "x5t#S256"):
            try:
                candidate = b64url_decode(str(header.get(name, ""))).hex()
            except (ValueError, binascii.Error):
                continue
            thumbprint = thumbprint or candidate
            if candidate in self.certificates:
                thumbprint, expires_at = candidate, self.certificates[candidate]
                break
        if expires_at is None:
            return entra_error(
                401,
                "invalid_client",
                700027,
                f"The certificate with identifier used to sign the client assertion is not "
                f"registered on application. [Reason - The key was not found., Thumbprint of "
                f"key used by client: '{thumbprint.upper()}']",
            )
        if expires_at <= time.time():
            return entra_error(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation. [Reason - The key used is "
                f"expired., Thumbprint of key used by client: '{thumbprint.upper()}']",
            )
        if str(claims.get("sub", "")).lower() != self.client_id:
            return entra_error(
                401,
                "invalid_client",
                700023,
                "Client assertion audience claim does not match Realm issuer.",
            )
        return None
