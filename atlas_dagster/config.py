"""Loading and validating ``atlas.yaml``.

The settings are typed, frozen models: unknown keys are refused and secrets are
:class:`~pydantic.SecretStr`, so that no repr, log line or error message can show them. The loader
is all-or-nothing: it returns a fully validated :class:`AtlasConfig` or raises
:class:`ConfigError` whose message is one line naming the file, the line, the entry and the field.
"""

from __future__ import annotations

import ipaddress
import os
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticUseDefault

from atlas_dagster.yaml_layout import Layout
from graph_contracts import POLICY_CONTRACTS

DEFAULT_DATABASE_URL = "sqlite:///.atlas/atlas.db"
DEFAULT_GRAPH_BASE_URL = "https://graph.microsoft.com"
DEFAULT_LOGIN_BASE_URL = "https://login.microsoftonline.com"
DEFAULT_WEBSERVER_URL = "http://127.0.0.1:3000"
SimulatorProfile = Literal["small", "standard", "medium", "large", "xlarge"]
RefreshJob = Literal["inventory_sync_job", "directory_groups_sync_job"]

DEMO_CONFIG_TEXT = """\
database_url: ${ATLAS_DATABASE_URL:-sqlite:///.atlas/atlas.db}
provider_connections:
  - key: contoso-demo
    display_name: Contoso (simulated demo tenant)
    simulated: {profile: small, seed: 1}
backup_schedules:
  - key: contoso-demo-nightly
    provider_connection: contoso-demo
    cron: "0 2 * * *"
    timezone: UTC
    policy_types: all
    retention_days: 30
    enabled: true
"""

# A secret setting: repr, str and format all mask it; ``get_secret_value()`` is the one way out.
Secret = SecretStr


class ConfigError(Exception):
    """A config that cannot be used. The message is the whole, one-line explanation."""


# --- Reading values ---------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class _Reading:
    """The validation context of a config file: its values are YAML scalars that may hold
    ``${VAR}`` references. Models built in code get no context and take their values as given."""

    env: Mapping[str, str]

    # Expansion happens per value after parsing, so a secret's characters can never change the
    # YAML structure.
    def expand(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if self.env.get(name):
                return self.env[name]
            if default is not None:
                return default
            raise _problem(f"environment variable {name} is not set")

        return _VAR.sub(sub, value)


def _problem(message: str, *at: str | int) -> PydanticCustomError:
    """A validation failure in our words, about ``at`` below the value being validated."""
    return PydanticCustomError("atlas_config", message, {"at": at})


def _expanded(value: Any, info: ValidationInfo) -> Any:
    return info.context.expand(value) if isinstance(info.context, _Reading) else value


def _given(value: Any, info: ValidationInfo) -> Any:
    """A text setting; left blank it is not given, so its default applies (or it is missing)."""
    value = _expanded(value, info)
    if value is None or value == "":
        raise PydanticUseDefault
    return value


def _flag(value: Any, info: ValidationInfo) -> bool:
    value = _expanded(value, info)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise _problem("expected true or false")
    return value


def _at_least(minimum: int) -> Callable[[Any, ValidationInfo], int]:
    def check(value: Any, info: ValidationInfo) -> int:
        value = _expanded(value, info)
        try:
            number = int(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is None or number < minimum:
            raise _problem(f"expected an integer of at least {minimum}")
        return number

    return check


def _share(value: Any, info: ValidationInfo) -> float:
    value = _expanded(value, info)
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = -1.0
    if not 0 < share <= 1:
        raise _problem("expected a share between 0 and 1")
    return share


def _one_of(allowed: Any, what: str) -> Callable[[Any, ValidationInfo], Any]:
    """A text setting whose value must be one of the literal type ``allowed``."""
    choices = get_args(allowed)

    def check(value: Any, info: ValidationInfo) -> Any:
        value = _given(value, info)
        if value not in choices:
            raise _problem(what.format(value=str(value), choices=", ".join(choices)))
        return value

    return check


def _entries(value: Any) -> Any:
    if not value:
        return ()
    if not isinstance(value, list | tuple):
        raise _problem("expected a list")
    return value


def _policy_types(value: Any, info: ValidationInfo) -> tuple[str, ...]:
    value = _expanded(value, info)
    if value == "all":
        return POLICY_CONTRACTS
    if not isinstance(value, list | tuple) or not value:
        raise _problem("expected 'all' or a list of contract keys")
    for item in value:
        if item not in POLICY_CONTRACTS:
            raise _problem(f"unknown contract {item!r}")
    return tuple(dict.fromkeys(value))


# --- Checking values --------------------------------------------------------------------------

_GUID = r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}"


def _matching(pattern: str, problem: str) -> AfterValidator:
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise _problem(problem)
        return value

    return AfterValidator(check)


def _base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _problem(f"expected an https:// URL, got {value!r}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise _problem("plain http:// is accepted only for loopback hosts")
    if parts.query or parts.fragment:
        raise _problem("must not carry a query or fragment")
    return value.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _database_url(url: str) -> str:
    if not url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg2:")):
        raise _problem("expected a sqlite:/// or postgresql:// URL")
    # A relative SQLite path is resolved once, here, so that every process (CLI, daemon, run
    # workers) opens the same file whatever its working directory later becomes.
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite:///:memory:":
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


# The five cron fields Dagster schedules take: (low, high, names). Checked here without importing
# Dagster (a command that only reads must start fast): the common cron syntax, never looser than
# Dagster (a test compares the two); croniter's extensions (L, #, wrapping ranges) are refused.
_CRON_FIELDS = (
    (0, 59, ()),
    (0, 23, ()),
    (1, 31, ()),
    (1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    (0, 7, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)
_CRON_ITEM = re.compile(r"(?:(\*)|(\w+)(?:-(\w+))?)(?:/(\d+))?")


def _cron_values(part: str, low: int, high: int, names: tuple[str, ...]) -> set[int] | None:
    """The values one cron field selects, or None when it is not valid."""

    def value(token: str) -> int | None:
        if token.isdigit():
            number = int(token)
        elif token.upper() in names:
            number = names.index(token.upper()) + low
        else:
            return None
        return number if low <= number <= high else None

    selected: set[int] = set()
    for item in part.split(","):
        match = _CRON_ITEM.fullmatch(item)
        if match is None:
            return None
        star, first, last, step = match.groups()
        start = low if star else value(first)
        end = high if star or (step and not last) else value(last) if last else start
        every = int(step) if step else 1
        if start is None or end is None or start > end or every < 1:
            return None
        selected.update(range(start, end + 1, every))
    return selected


_CRON_ALIASES = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)


def _cron(expression: str) -> str:
    if expression.strip() in _CRON_ALIASES:
        return expression
    parts = expression.split()
    values = (
        [_cron_values(p, *f) for p, f in zip(parts, _CRON_FIELDS, strict=True)]
        if len(parts) == 5
        else [None]
    )
    # Dagster refuses a day that never comes (30 or 31 February).
    never = len(values) == 5 and values[3] == {2} and values[2] in ({30}, {31})
    if any(v is None for v in values) or never:
        raise _problem(f"not a valid cron expression: {expression!r}")
    return expression


def _timezone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _problem(f"unknown timezone {name!r}") from None
    return name


def _existing_file(path: str) -> str:
    if not Path(path).is_file():
        raise _problem(f"no such file: {path}")
    return path


_Text = Annotated[str, BeforeValidator(_given)]
_SLUG = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_Key = Annotated[_Text, _matching(_SLUG, "must be a slug: lowercase letters, digits and '-'")]
_TENANT = rf"{_GUID}|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+"
_TenantId = Annotated[_Text, _matching(_TENANT, "expected a GUID or a tenant domain name")]
_ClientId = Annotated[_Text, _matching(_GUID, "expected a GUID")]
_SHA1 = _matching("[0-9A-Fa-f]{40}", "expected the 40 hex digit SHA-1 thumbprint")
_Thumbprint = Annotated[_Text, _SHA1, AfterValidator(str.upper)]
_Url = Annotated[_Text, AfterValidator(_base_url)]
_Cron = Annotated[_Text, AfterValidator(_cron)]
_Timezone = Annotated[_Text, AfterValidator(_timezone)]
_Flag = Annotated[bool, BeforeValidator(_flag)]
_Entries = BeforeValidator(_entries)


# --- The settings -----------------------------------------------------------------------------


class _Model(BaseModel):
    # Frozen, so settings are hashable: engines and Graph clients are cached per config and per
    # connection. Numbers given where text is expected read as that text.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping_of_known_keys(cls, data: Any, info: ValidationInfo) -> Any:
        # In a file, an unknown key is named before any field it may have been meant as.
        if not isinstance(info.context, _Reading):
            return data
        if not isinstance(data, dict):
            raise _problem(f"expected a mapping, got {type(data).__name__}")
        allowed = sorted(name for name, spec in cls.model_fields.items() if not spec.exclude)
        for key in data:
            if key not in allowed:
                raise _problem(f"unknown key (allowed: {', '.join(allowed)})", str(key))
        return data


class Certificate(_Model):
    private_key_path: Annotated[_Text, AfterValidator(_existing_file)]
    thumbprint: _Thumbprint


class Simulated(_Model):
    profile: Annotated[
        SimulatorProfile,
        BeforeValidator(_one_of(SimulatorProfile, "unknown profile {value!r} (one of {choices})")),
    ] = "small"
    seed: Annotated[int, BeforeValidator(_at_least(0))] = 1


class ProviderConnection(_Model):
    key: _Key
    display_name: str = Field("", validate_default=True)  # the key when not given
    tenant_id: _TenantId | None = None
    client_id: _ClientId | None = None
    client_secret: Annotated[SecretStr | None, BeforeValidator(_given)] = None
    certificate: Certificate | None = None
    graph_base_url: _Url = DEFAULT_GRAPH_BASE_URL
    login_base_url: _Url = DEFAULT_LOGIN_BASE_URL
    simulated: Simulated | None = None

    @field_validator("display_name", mode="before")
    @classmethod
    def _named(cls, value: Any, info: ValidationInfo) -> Any:
        value = _expanded(value, info)
        return info.data.get("key", "") if value is None or value == "" else value

    @model_validator(mode="after")
    def _credentials(self) -> ProviderConnection:
        # A simulated tenant signs in as the simulator's own app.
        if self.simulated is None:
            for name in ("tenant_id", "client_id"):
                if getattr(self, name) is None:
                    raise _problem("is required", name)
        if self.client_secret is not None and self.certificate is not None:
            raise _problem("give either client_secret or certificate, not both")
        if self.simulated is None and self.client_secret is None and self.certificate is None:
            raise _problem("is required (or a certificate)", "client_secret")
        return self


class BackupSchedule(_Model):
    key: _Key
    provider_connection: _Text
    cron: _Cron
    timezone: _Timezone = "UTC"
    policy_types: Annotated[tuple[str, ...], BeforeValidator(_policy_types)] = POLICY_CONTRACTS
    retention_days: Annotated[int, BeforeValidator(_at_least(1))] = 30
    enabled: _Flag = True


class RefreshSchedule(_Model):
    """Optional periodic refresh of the cached inventory or groups of every connection."""

    key: _Key
    job: Annotated[RefreshJob, BeforeValidator(_one_of(RefreshJob, "expected one of {choices}"))]
    cron: _Cron
    timezone: _Timezone = "UTC"
    enabled: _Flag = True


class AtlasConfig(_Model):
    # Where the settings were read from; not itself a setting.
    source: str = Field("", exclude=True)
    database_url: Annotated[_Text, AfterValidator(_database_url)] = Field(
        DEFAULT_DATABASE_URL, validate_default=True
    )
    provider_connections: Annotated[tuple[ProviderConnection, ...], _Entries] = ()
    backup_schedules: Annotated[tuple[BackupSchedule, ...], _Entries] = ()
    refresh_schedules: Annotated[tuple[RefreshSchedule, ...], _Entries] = ()
    dagster_webserver_url: _Url = DEFAULT_WEBSERVER_URL
    mass_deletion_threshold: Annotated[float, BeforeValidator(_share)] = 0.5

    @model_validator(mode="after")
    def _keys_and_references(self) -> AtlasConfig:
        connections: set[str] = set()
        # Backup and refresh schedules share one namespace: both become Dagster schedules.
        schedules: set[str] = set()
        for name, entries, seen in (
            ("provider_connections", self.provider_connections, connections),
            ("backup_schedules", self.backup_schedules, schedules),
            ("refresh_schedules", self.refresh_schedules, schedules),
        ):
            for index, entry in enumerate(entries):
                if entry.key in seen:
                    raise _problem(f"duplicate key {entry.key!r}", name, index, "key")
                seen.add(entry.key)
                target = getattr(entry, "provider_connection", None)
                if target is not None and target not in connections:
                    problem = f"no provider connection with key {target!r}"
                    raise _problem(problem, name, index, "provider_connection")
        return self

    def connection(self, key: str) -> ProviderConnection:
        return {conn.key: conn for conn in self.provider_connections}[key]

    def schedule(self, key: str) -> BackupSchedule:
        return {sched.key: sched for sched in self.backup_schedules}[key]


# --- Loading --------------------------------------------------------------------------------


def config_path() -> Path | None:
    """The config file in force: ``$ATLAS_CONFIG``, else ``./atlas.yaml``, else none (demo)."""
    env = os.environ.get("ATLAS_CONFIG")
    if env:
        return Path(env)
    local = Path("atlas.yaml")
    return local if local.exists() else None


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> AtlasConfig:
    env = os.environ if env is None else env
    if path is None:
        path = config_path()
    if path is None:
        return parse_config(DEMO_CONFIG_TEXT, "<built-in demo config>", env)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    return parse_config(text, str(path), env)


def parse_config(text: str, source: str, env: Mapping[str, str]) -> AtlasConfig:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        layout = Layout.of(node)
        problem = layout.structure_problem()
        if problem is not None:
            raise ConfigError(f"{source}: {problem}")
        raw = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()
    try:
        config = AtlasConfig.model_validate(raw, context=_Reading(env))
    except ValidationError as exc:
        # ``from None``: pydantic's own text quotes input values, and one of them may be a secret.
        raise ConfigError(f"{source}: {layout.explain(exc.errors()[0])}") from None
    return config.model_copy(update={"source": source})
