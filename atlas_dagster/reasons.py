"""Reason codes of the operation ledger and the errors that carry them (docs/architecture.md)."""

from __future__ import annotations

from typing import Any

PROVIDER_AUTH_FAILED = "provider_auth_failed"
PROVIDER_PERMISSION_DENIED = "provider_permission_denied"
PROVIDER_CONSENT_MISSING = "provider_consent_missing"
PROVIDER_THROTTLED = "provider_throttled"
PROVIDER_UNAVAILABLE = "provider_unavailable"
PROVIDER_NOT_FOUND = "provider_not_found"
PROVIDER_BAD_RESPONSE = "provider_bad_response"
PROVIDER_CONNECTION_MISSING = "provider_connection_missing"
PROVIDER_CONNECTION_INVALID = "provider_connection_invalid"
RUN_CANCELLED = "run_cancelled"
RUN_CRASHED = "run_crashed"
DISPATCH_FAILED = "dispatch_failed"
INTERNAL_ERROR = "internal_error"
# A sync held deletions back (the mass-deletion guard); the rest was refreshed.
MASS_DELETION_HELD = "mass_deletion_held"
# Restores: why an item was not written, or why its outcome is not known.
RESTORE_CONFLICT = "restore_conflict"
RESTORE_GROUP_UNMAPPED = "restore_group_unmapped"
RESTORE_REFERENCE_UNMAPPED = "restore_reference_unmapped"
RESTORE_UNSUPPORTED = "restore_unsupported"
RESTORE_PLAN_EXPIRED = "restore_plan_expired"
RESTORE_OUTCOME_UNKNOWN = "restore_outcome_unknown"
RESTORE_SECRET_UNAVAILABLE = "restore_secret_unavailable"

REASON_CODES = frozenset(
    {
        PROVIDER_AUTH_FAILED,
        PROVIDER_PERMISSION_DENIED,
        PROVIDER_CONSENT_MISSING,
        PROVIDER_THROTTLED,
        PROVIDER_UNAVAILABLE,
        PROVIDER_NOT_FOUND,
        PROVIDER_BAD_RESPONSE,
        PROVIDER_CONNECTION_MISSING,
        PROVIDER_CONNECTION_INVALID,
        RUN_CANCELLED,
        RUN_CRASHED,
        DISPATCH_FAILED,
        INTERNAL_ERROR,
        MASS_DELETION_HELD,
        RESTORE_CONFLICT,
        RESTORE_GROUP_UNMAPPED,
        RESTORE_REFERENCE_UNMAPPED,
        RESTORE_UNSUPPORTED,
        RESTORE_PLAN_EXPIRED,
        RESTORE_OUTCOME_UNKNOWN,
        RESTORE_SECRET_UNAVAILABLE,
    }
)

# Reasons that make a verification fail outright rather than partially succeed.
BLOCKING_FOR_VERIFICATION = frozenset(
    {
        PROVIDER_AUTH_FAILED,
        PROVIDER_PERMISSION_DENIED,
        PROVIDER_CONNECTION_MISSING,
        PROVIDER_CONNECTION_INVALID,
    }
)

# Reasons no single policy type can escape (sign-in, consent, a broken connection): a sync or
# backup stops at the first one instead of failing every type in turn.
FATAL_FOR_ALL_TYPES = frozenset(
    {PROVIDER_AUTH_FAILED, PROVIDER_CONSENT_MISSING, PROVIDER_CONNECTION_INVALID}
)


class AtlasError(Exception):
    """An error with a ledger reason code. ``str(err)`` is one line, safe to log and store."""

    def __init__(self, reason_code: str, message: str, *, contract_key: str | None = None):
        if reason_code not in REASON_CODES:
            raise ValueError(f"unknown reason code {reason_code!r}")
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message
        self.contract_key = contract_key

    def as_failure(self) -> dict[str, Any]:
        return failure(self.reason_code, self.message, self.contract_key)


class GraphError(AtlasError):
    """A Microsoft Graph call that failed after the client's retries."""

    def __init__(
        self,
        reason_code: str,
        message: str,
        *,
        contract_key: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        client_request_id: str | None = None,
    ):
        super().__init__(reason_code, message, contract_key=contract_key)
        self.status = status
        self.request_id = request_id
        self.client_request_id = client_request_id


class DeltaExpired(GraphError):
    """The stored delta link is no longer accepted (HTTP 410, or older than 7 days): the caller
    must fall back to a full resync."""


class WriteUncertain(GraphError):
    """A write that is not safe to send again (a create, an action that adds) got no answer or
    a server error: it may or may not have happened (``restore_outcome_unknown``)."""


def failure(reason_code: str, message: str, contract_key: str | None = None) -> dict[str, Any]:
    """One ``failure_summary`` entry."""
    if reason_code not in REASON_CODES:
        raise ValueError(f"unknown reason code {reason_code!r}")
    # The message may quote what Graph sent (a name, an id): the ledger's JSON holds no NUL, so
    # a NUL shows as U+2400, as in every text column people read (stores/bulk.py).
    entry: dict[str, Any] = {
        "reason_code": reason_code,
        "message": message[:2000].replace("\x00", "\u2400"),
    }
    if contract_key:
        entry["contract_key"] = contract_key
    return entry


def one_line(exc: BaseException) -> str:
    """An exception as one line for people: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def failure_of(exc: BaseException) -> dict[str, Any]:
    """The ``failure_summary`` entry for an exception: its own reason for an AtlasError, else
    ``internal_error`` with the exception as one line."""
    if isinstance(exc, AtlasError):
        return exc.as_failure()
    return failure(INTERNAL_ERROR, one_line(exc))
