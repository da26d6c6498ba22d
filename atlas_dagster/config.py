"""Loading and validating ``atlas.yaml`` (DESIGN §3).

The loader is all-or-nothing: it returns a fully validated :class:`AtlasConfig` or raises
:class:`ConfigError` whose message is one line naming the file, the entry and the field. Secrets
are wrapped in :class:`Secret` so that no repr, log line or error message can show them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from graph_contracts import POLICY_CONTRACTS

DEFAULT_DATABASE_URL = "sqlite:///.atlas/atlas.db"
DEFAULT_GRAPH_BASE_URL = "https://graph.microsoft.com"
DEFAULT_LOGIN_BASE_URL = "https://login.microsoftonline.com"
DEFAULT_WEBSERVER_URL = "http://127.0.0.1:3000"
SIMULATOR_PROFILES = ("small", "medium", "large", "xlarge")

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


class ConfigError(Exception):
    """A config that cannot be used. The message is the whole, one-line explanation."""


class Secret:
    """A value that is never shown: repr, str and format all mask it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Certificate:
    private_key_path: str
    thumbprint: str


@dataclass(frozen=True)
class Simulated:
    profile: str = "small"
    seed: int = 1


@dataclass(frozen=True)
class ProviderConnection:
    key: str
    display_name: str
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    certificate: Certificate | None = None
    graph_base_url: str = DEFAULT_GRAPH_BASE_URL
    login_base_url: str = DEFAULT_LOGIN_BASE_URL
    simulated: Simulated | None = None


@dataclass(frozen=True)
class BackupSchedule:
    key: str
    provider_connection: str
    cron: str
    timezone: str = "UTC"
    policy_types: tuple[str, ...] = POLICY_CONTRACTS
    retention_days: int = 30
    enabled: bool = True


@dataclass(frozen=True)
class RefreshSchedule:
    """Optional periodic refresh of the cached inventory or groups of every connection."""

    key: str
    job: str
    cron: str
    timezone: str = "UTC"
    enabled: bool = True


@dataclass(frozen=True)
class AtlasConfig:
    source: str
    database_url: str
    provider_connections: tuple[ProviderConnection, ...] = ()
    backup_schedules: tuple[BackupSchedule, ...] = ()
    refresh_schedules: tuple[RefreshSchedule, ...] = ()
    dagster_webserver_url: str = DEFAULT_WEBSERVER_URL
    mass_deletion_threshold: float = 0.5

    def connection(self, key: str) -> ProviderConnection:
        for conn in self.provider_connections:
            if conn.key == key:
                return conn
        raise KeyError(key)

    def schedule(self, key: str) -> BackupSchedule:
        for sched in self.backup_schedules:
            if sched.key == key:
                return sched
        raise KeyError(key)


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
        problem = _structure_problem(node)
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
    return _Validator(source, env).config(raw)


_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _structure_problem(node: yaml.Node | None) -> str | None:
    """What YAML allows but a config must not have, as ``where: problem``: no settings at all
    (an empty file is a mistake, not the demo), or a key given twice in one mapping, which YAML
    loaders resolve by silently keeping the last."""
    if node is None or node.tag == _NULL_TAG:
        line = node.start_mark.line + 1 if node is not None else 1
        return (
            f"line {line}: the file holds no settings "
            "(expected a mapping such as 'provider_connections: [...]')"
        )
    duplicate = _duplicate_key(node, "", set())
    if duplicate is None:
        return None
    where, line, first = duplicate
    return f"{where}: duplicate key at line {line} (first given at line {first})"


def _duplicate_key(node: yaml.Node, where: str, visited: set[int]) -> tuple[str, int, int] | None:
    """The first key, in file order, given twice in one mapping under ``node``: its path (named
    as the validator names entries and fields), its line and the line of its first use."""
    if id(node) in visited:  # an alias of a node already checked
        return None
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found = _duplicate_key(item, f"{where}[{_entry_label(item, index)}]", visited)
            if found is not None:
                return found
    elif isinstance(node, yaml.MappingNode):
        first_lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                continue  # merged keys may be overridden; that is what a merge is for
            path = f"{where}.{key.value}" if where else key.value
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first_lines:
                return path, line, first_lines[key.tag, key.value]
            first_lines[key.tag, key.value] = line
            found = _duplicate_key(value, path, visited)
            if found is not None:
                return found
    return None


def _entry_label(item: yaml.Node, index: int) -> str:
    """A list entry's name in messages: its ``key`` when it has one, else its index."""
    if isinstance(item, yaml.MappingNode):
        for key, value in item.value:
            if (
                isinstance(key, yaml.ScalarNode)
                and key.value == "key"
                and isinstance(value, yaml.ScalarNode)
                and value.tag == _STR_TAG
                and value.value
            ):
                return value.value
    return str(index)


_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_DOMAIN = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Validator:
    TOP = {
        "database_url",
        "dagster_webserver_url",
        "mass_deletion_threshold",
        "provider_connections",
        "backup_schedules",
        "refresh_schedules",
    }
    CONNECTION = {
        "key",
        "display_name",
        "tenant_id",
        "client_id",
        "client_secret",
        "certificate",
        "graph_base_url",
        "login_base_url",
        "simulated",
    }
    SCHEDULE = {
        "key",
        "provider_connection",
        "cron",
        "timezone",
        "policy_types",
        "retention_days",
        "enabled",
    }
    REFRESH = {"key", "job", "cron", "timezone", "enabled"}
    REFRESH_JOBS = ("inventory_sync_job", "directory_groups_sync_job")

    def __init__(self, source: str, env: Mapping[str, str]):
        self.source = source
        self.env = env

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {problem}")

    # Expansion happens per value after parsing, so a secret's characters can never change the
    # YAML structure.
    def expand(self, value: Any, where: str) -> Any:
        if not isinstance(value, str):
            return value

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.env and self.env[name] != "":
                return self.env[name]
            if default is not None:
                return default
            raise self.fail(where, f"environment variable {name} is not set")

        return _VAR.sub(sub, value)

    def mapping(self, value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                raise self.fail(
                    f"{where}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})"
                )
        return value

    def string(
        self, obj: dict[str, Any], name: str, where: str, *, required: bool = False
    ) -> str | None:
        value = self.expand(obj.get(name), f"{where}.{name}")
        if value is None or value == "":
            if required:
                raise self.fail(f"{where}.{name}", "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(f"{where}.{name}", f"expected a string, got {type(value).__name__}")
        return str(value)

    def boolean(self, obj: dict[str, Any], name: str, where: str, default: bool) -> bool:
        value = self.expand(obj.get(name, default), f"{where}.{name}")
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise self.fail(f"{where}.{name}", "expected true or false")
        return value

    def integer(
        self, obj: dict[str, Any], name: str, where: str, default: int, minimum: int
    ) -> int:
        value = self.expand(obj.get(name, default), f"{where}.{name}")
        try:
            number = int(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number < minimum:
            raise self.fail(f"{where}.{name}", f"expected an integer of at least {minimum}")
        return number

    def url(self, value: str, where: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(where, f"expected an https:// URL, got {value!r}")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise self.fail(where, "plain http:// is accepted only for loopback hosts")
        if parts.query or parts.fragment:
            raise self.fail(where, "must not carry a query or fragment")
        return value.rstrip("/")

    def entries(self, raw: dict[str, Any], name: str) -> list[tuple[str, Any]]:
        value = raw.get(name) or []
        if not isinstance(value, list):
            raise self.fail(name, "expected a list")
        out = []
        for index, entry in enumerate(value):
            label = entry.get("key") if isinstance(entry, dict) else None
            where = f"{name}[{label}]" if isinstance(label, str) and label else f"{name}[{index}]"
            out.append((where, entry))
        return out

    def unique_key(self, obj: dict[str, Any], where: str, seen: set[str]) -> str:
        key = self.string(obj, "key", where, required=True)
        assert key is not None
        if not _SLUG.match(key):
            raise self.fail(f"{where}.key", "must be a slug: lowercase letters, digits and '-'")
        if key in seen:
            raise self.fail(f"{where}.key", f"duplicate key {key!r}")
        seen.add(key)
        return key

    def config(self, raw: Any) -> AtlasConfig:
        raw = self.mapping(raw, "top level", self.TOP)
        database_url = self.string(raw, "database_url", "database_url") or DEFAULT_DATABASE_URL
        if not database_url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg2:")):
            raise self.fail("database_url", "expected a sqlite:/// or postgresql:// URL")
        webserver = self.string(raw, "dagster_webserver_url", "dagster_webserver_url")
        threshold_raw = self.expand(
            raw.get("mass_deletion_threshold", 0.5), "mass_deletion_threshold"
        )
        try:
            threshold = float(threshold_raw)
        except (TypeError, ValueError):
            threshold = -1.0
        if not 0 < threshold <= 1:
            raise self.fail("mass_deletion_threshold", "expected a share between 0 and 1")

        connections: list[ProviderConnection] = []
        seen: set[str] = set()
        for where, entry in self.entries(raw, "provider_connections"):
            connections.append(self.connection(entry, where, seen))

        schedules: list[BackupSchedule] = []
        seen = set()
        known = {c.key for c in connections}
        for where, entry in self.entries(raw, "backup_schedules"):
            schedules.append(self.schedule(entry, where, seen, known))

        refresh: list[RefreshSchedule] = []
        for where, entry in self.entries(raw, "refresh_schedules"):
            refresh.append(self.refresh(entry, where, seen))

        return AtlasConfig(
            source=self.source,
            database_url=_absolute_sqlite(database_url),
            provider_connections=tuple(connections),
            backup_schedules=tuple(schedules),
            refresh_schedules=tuple(refresh),
            dagster_webserver_url=self.url(webserver, "dagster_webserver_url")
            if webserver
            else DEFAULT_WEBSERVER_URL,
            mass_deletion_threshold=threshold,
        )

    def connection(self, entry: Any, where: str, seen: set[str]) -> ProviderConnection:
        obj = self.mapping(entry, where, self.CONNECTION)
        key = self.unique_key(obj, where, seen)
        display_name = self.string(obj, "display_name", where) or key
        simulated = None
        if obj.get("simulated") is not None:
            sim = self.mapping(obj["simulated"], f"{where}.simulated", {"profile", "seed"})
            profile = self.string(sim, "profile", f"{where}.simulated") or "small"
            if profile not in SIMULATOR_PROFILES:
                raise self.fail(
                    f"{where}.simulated.profile",
                    f"unknown profile {profile!r} (one of {', '.join(SIMULATOR_PROFILES)})",
                )
            simulated = Simulated(profile, self.integer(sim, "seed", f"{where}.simulated", 1, 0))

        tenant_id = self.string(obj, "tenant_id", where, required=simulated is None)
        client_id = self.string(obj, "client_id", where, required=simulated is None)
        if tenant_id is not None and not (_GUID.match(tenant_id) or _DOMAIN.match(tenant_id)):
            raise self.fail(f"{where}.tenant_id", "expected a GUID or a tenant domain name")
        if client_id is not None and not _GUID.match(client_id):
            raise self.fail(f"{where}.client_id", "expected a GUID")

        secret_text = self.string(obj, "client_secret", where)
        certificate = None
        if obj.get("certificate") is not None:
            cw = f"{where}.certificate"
            cert = self.mapping(obj["certificate"], cw, {"private_key_path", "thumbprint"})
            key_path = self.string(cert, "private_key_path", cw, required=True)
            thumbprint = self.string(cert, "thumbprint", cw, required=True)
            assert key_path is not None and thumbprint is not None
            if not Path(key_path).is_file():
                raise self.fail(f"{cw}.private_key_path", f"no such file: {key_path}")
            if not re.fullmatch(r"[0-9A-Fa-f]{40}", thumbprint):
                raise self.fail(f"{cw}.thumbprint", "expected the 40 hex digit SHA-1 thumbprint")
            certificate = Certificate(key_path, thumbprint.upper())
        if secret_text and certificate:
            raise self.fail(where, "give either client_secret or certificate, not both")
        if simulated is None and not secret_text and certificate is None:
            raise self.fail(f"{where}.client_secret", "is required (or a certificate)")

        graph = self.string(obj, "graph_base_url", where) or DEFAULT_GRAPH_BASE_URL
        login = self.string(obj, "login_base_url", where) or DEFAULT_LOGIN_BASE_URL
        return ProviderConnection(
            key=key,
            display_name=display_name,
            tenant_id=tenant_id,
            client_id=client_id,
            client_secret=Secret(secret_text) if secret_text else None,
            certificate=certificate,
            graph_base_url=self.url(graph, f"{where}.graph_base_url"),
            login_base_url=self.url(login, f"{where}.login_base_url"),
            simulated=simulated,
        )

    def cron_and_timezone(self, obj: dict[str, Any], where: str) -> tuple[str, str]:
        cron = self.string(obj, "cron", where, required=True)
        assert cron is not None
        if not is_valid_cron(cron):
            raise self.fail(f"{where}.cron", f"not a valid cron expression: {cron!r}")
        timezone = self.string(obj, "timezone", where) or "UTC"
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise self.fail(f"{where}.timezone", f"unknown timezone {timezone!r}") from None
        return cron, timezone

    def schedule(self, entry: Any, where: str, seen: set[str], known: set[str]) -> BackupSchedule:
        obj = self.mapping(entry, where, self.SCHEDULE)
        key = self.unique_key(obj, where, seen)
        connection = self.string(obj, "provider_connection", where, required=True)
        if connection not in known:
            raise self.fail(
                f"{where}.provider_connection", f"no provider connection with key {connection!r}"
            )
        cron, timezone = self.cron_and_timezone(obj, where)
        raw_types = self.expand(obj.get("policy_types", "all"), f"{where}.policy_types")
        if raw_types == "all":
            policy_types = POLICY_CONTRACTS
        elif isinstance(raw_types, list) and raw_types:
            for item in raw_types:
                if item not in POLICY_CONTRACTS:
                    raise self.fail(f"{where}.policy_types", f"unknown contract {item!r}")
            policy_types = tuple(dict.fromkeys(raw_types))
        else:
            raise self.fail(f"{where}.policy_types", "expected 'all' or a list of contract keys")
        return BackupSchedule(
            key=key,
            provider_connection=connection,
            cron=cron,
            timezone=timezone,
            policy_types=policy_types,
            retention_days=self.integer(obj, "retention_days", where, 30, 1),
            enabled=self.boolean(obj, "enabled", where, True),
        )

    def refresh(self, entry: Any, where: str, seen: set[str]) -> RefreshSchedule:
        obj = self.mapping(entry, where, self.REFRESH)
        key = self.unique_key(obj, where, seen)
        job = self.string(obj, "job", where, required=True)
        if job not in self.REFRESH_JOBS:
            raise self.fail(f"{where}.job", f"expected one of {', '.join(self.REFRESH_JOBS)}")
        assert job is not None
        cron, timezone = self.cron_and_timezone(obj, where)
        return RefreshSchedule(key, job, cron, timezone, self.boolean(obj, "enabled", where, True))


def is_valid_cron(expr: str) -> bool:
    from dagster._utils.schedules import is_valid_cron_string

    return is_valid_cron_string(expr)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _absolute_sqlite(url: str) -> str:
    # A relative SQLite path is resolved once, here, so that every process (CLI, daemon, run
    # workers) opens the same file whatever its working directory later becomes.
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite:///:memory:":
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url
