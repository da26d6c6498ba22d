"""Graph's error bodies read into the ledger's reason codes and one-line messages (pure)."""

from __future__ import annotations

import json
import re
from typing import Any

from atlas_dagster import reasons
from atlas_dagster.reasons import DeltaExpired, GraphError
from graph_contracts import Contract


def collapse_whitespace(value: Any) -> str:
    return " ".join(str(value).split())


# Intune appends support ids and its internal service URL; they only lengthen the ledger.
_INTUNE_TAIL = re.compile(r"\s+-\s+Operation ID \(for customer support\).*$")


def parse_error_body(body: Any) -> tuple[str | None, str]:
    """Graph's error code and the innermost human message.

    Directory APIs answer ``{"error": {"code": "Authorization_RequestDenied", "message": ...}}``;
    Intune nests a JSON document (sometimes twice) in ``error.message`` whose ``Message`` holds
    the text.
    """
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, ""
    code = error.get("code")
    message: Any = error.get("message") or ""
    for _ in range(4):  # unwrap nested JSON documents
        if not isinstance(message, str) or not message.lstrip().startswith("{"):
            break
        try:
            inner = json.loads(message)
        except ValueError:
            break
        if not isinstance(inner, dict):
            break
        if code in (None, "UnknownError") and isinstance(inner.get("ErrorCode"), str):
            code = inner["ErrorCode"]
        message = inner.get("Message", inner.get("message", ""))
    return (str(code) if code else None), _INTUNE_TAIL.sub("", collapse_whitespace(message))


_SCOPE_PHRASE = re.compile(
    r"(?:following scopes?|missing permission scopes?|required scopes?)\s*:?\s*([^-]*)",
    re.IGNORECASE,
)
_SCOPE_NAME = re.compile(r"[A-Za-z]+(?:\.[A-Za-z]+)+")


def missing_scopes(message: str) -> list[str]:
    """Permission names that a 403 message says are required, in order."""
    match = _SCOPE_PHRASE.search(message)
    if not match:
        return []
    return list(dict.fromkeys(_SCOPE_NAME.findall(match.group(1))))


def classify_error(status: int, body: Any, required: tuple[str, ...] = ()) -> tuple[str, str]:
    """The reason code and a one-line message for a failed (non-retryable) Graph response. A 403
    that names no permission is explained by ``required``, the contract's own."""
    code, message = parse_error_body(body)
    described = f"{code}: {message}" if code and message else (code or message or "no details")
    if status == 403:
        lowered = f"{code} {message}".lower()
        if "consent" in lowered or "AADSTS65001" in message:
            return reasons.PROVIDER_CONSENT_MISSING, described
        scopes = missing_scopes(message)
        if scopes:
            return (
                reasons.PROVIDER_PERMISSION_DENIED,
                f"missing permission (needs one of: {', '.join(scopes)}); {described}",
            )
        if required:
            described = f"missing permission (requires {', '.join(required)}); {described}"
        return reasons.PROVIDER_PERMISSION_DENIED, described
    if status == 401:
        return reasons.PROVIDER_AUTH_FAILED, described
    if status in (404, 410):
        return reasons.PROVIDER_NOT_FOUND, described
    if status >= 500:
        return reasons.PROVIDER_UNAVAILABLE, described
    return reasons.PROVIDER_BAD_RESPONSE, described


_DELTA_EXPIRED_CODES = frozenset(
    {"syncstatenotfound", "syncstateinvalid", "resyncrequired", "expiredtoken"}
)


def is_delta_expired(status: int, body: Any) -> bool:
    """Graph answers 410 Gone to a delta token it no longer keeps (some services say so with a
    400 and a resync error code instead)."""
    if status == 410:
        return True
    code, _ = parse_error_body(body)
    return status == 400 and (code or "").lower() in _DELTA_EXPIRED_CODES


def response_error(
    contract: Contract, status: int, body: Any, where: str, ids: dict[str, str | None]
) -> GraphError:
    """The GraphError of a failed response or ``$batch`` sub-response (``where`` names the
    item): DeltaExpired when a delta contract's link is gone, else the classified reason."""
    kw: dict[str, Any] = {"contract_key": contract.key, "status": status, **ids}
    if contract.paging == "delta" and is_delta_expired(status, body):
        _, message = parse_error_body(body)
        return DeltaExpired(
            reasons.PROVIDER_NOT_FOUND,
            f"{contract.key}: the delta link expired (HTTP {status}); a full resync is "
            f"needed{': ' + message if message else ''}",
            **kw,
        )
    reason, message = classify_error(status, body, contract.permissions)
    return GraphError(reason, f"{contract.key}: {where}HTTP {status}: {message}", **kw)
