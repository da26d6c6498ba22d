"""The Graph Contract Registry: every Microsoft Graph call atlas_dagster makes, as data.

A contract names one request shape: the API version, the path (``{id}`` marks a per-item read),
the query it sends, how it pages, which application permissions it needs, and — for policy
collections — how the objects it returns are classified, named, dated, and enriched with
assignments and details. The GraphClient refuses any request that matches no contract, so this
module is also the allow-list of what the platform may ask a tenant.

Everything here is pure: no I/O, no httpx.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import quote

from atlas_dagster.reasons import RESTORE_SECRET_UNAVAILABLE, RESTORE_UNSUPPORTED

Paging = Literal["none", "next_link", "delta"]
DetailMode = Literal["collection", "merge"]
Method = Literal["GET", "POST", "PATCH", "PUT", "DELETE"]
Throttle = Literal["intune", "intune_write", "directory"]
# What a write does to the object it targets (the simulator applies writes by it):
# create: a new object from the body; patch: the body's top-level fields, nothing nested;
# replace: the top-level fields and ``source`` from the body (PUT); set: ``source`` becomes the
# list under ``body_key``; merge: elements under ``body_key`` replace those of ``source`` with
# the same ``match_field``, others stay; delta: ``delta_keys`` name the added, updated and deleted
# (ids) elements of ``source``; append, patch_element, remove_element: one element of
# ``source`` (``{sub_id}`` names it); field: the top-level field ``source`` becomes the value
# under ``body_key``.
WriteEffect = Literal[
    "create", "patch", "replace", "set", "merge", "delta", "append", "patch_element",
    "remove_element", "field",
]  # fmt: skip


@dataclass(frozen=True)
class TypeRule:
    """Maps one ``@odata.type`` to a policy type."""

    odata_type: str
    policy_type: str
    platform: str | None = None


@dataclass(frozen=True)
class BuiltinRule:
    """Recognises the tenant's built-in default objects (Intune creates them; they cannot be
    deleted, and restoring them means patching, not creating)."""

    id_suffixes: tuple[str, ...] = ()
    field_equals: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Detail:
    """A per-item read that Graph cannot return inline on the list.

    ``collection`` details land as a list under ``key`` (following every page); ``merge`` details
    are a GET of the item itself whose fields are merged into the listed object (for properties
    such as ``scriptContent`` that lists omit).
    """

    key: str
    contract: str
    mode: DetailMode = "collection"


@dataclass(frozen=True)
class Write:
    """One request Graph takes to write (part of) a policy object.

    ``path`` holds ``{id}`` for the object (or, with ``id_from``, the backed-up object's field of
    that name, e.g. the template an intent is created from) and ``{sub_id}`` for one element of
    its nested content. ``status`` is what Graph answers on success (clients accept any 2xx:
    Microsoft's pages and what peers observe disagree for a few actions). ``source`` is the part
    of the backed-up object the request carries (a nested collection or a field; None: the
    top-level fields) and ``body_key`` the key wrapping it in the request body (None: the element
    or the fields are the body).
    """

    name: str
    method: Method
    path: str
    permissions: tuple[str, ...]
    effect: WriteEffect
    status: int
    source: str | None = None
    body_key: str | None = None
    match_field: str = "id"
    delta_keys: tuple[str, ...] = ()
    id_from: str | None = None
    # Navigation properties an element names by ``<name>@odata.bind``: the path (after the
    # version root) each binds to, ``{id}`` the bound object's and ``{definition}`` its
    # definition's id.
    binds: tuple[tuple[str, str], ...] = ()

    @property
    def body_keys(self) -> tuple[str, ...]:
        """The body keys that say a request is this write (several writes can share a path)."""
        return self.delta_keys or ((self.body_key,) if self.body_key else ())


@dataclass(frozen=True)
class SecretRule:
    """A value Graph returns masked (or not at all) that a restore must not write back.

    The rule looks at the object itself, or at each element of ``collection`` (every nested
    mapping under it with ``deep``), for a mapping whose ``when`` fields hold one of the listed
    values; such a mapping's ``field`` is a secret, named by ``name_field`` (of the mapping or the
    nearest enclosing one). ``odata_types`` limits the rule to objects of those types.
    """

    field: str
    when: tuple[tuple[str, tuple[Any, ...]], ...]
    collection: str | None = None
    deep: bool = False
    name_field: str | None = None
    odata_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class TemplateCheck:
    """A create Graph refuses depending on another object: the read ``contract`` fetches it by
    the backed-up object's ``id_from`` field, and a ``field`` equal to ``refused`` refuses."""

    contract: str
    id_from: str
    field: str
    refused: Any


@dataclass(frozen=True)
class WriteContract:
    """How Graph writes one policy collection: create, update of the top-level fields, the
    assign action, the writes of nested content, and what cannot be restored and why.

    ``read_only`` fields are never sent (Graph sets them); ``create_only`` ones are sent on
    create and Graph refuses a change of them later. ``create_inline`` maps nested content the
    create body carries itself (backup key, body key); ``create_needs`` is inline content Graph
    refuses a create without. A built-in object (the contract's BuiltinRule) is never created and
    takes only the writes named in ``builtin_writes``; ``builtin_why`` says why in a skip.
    ``backup_needs`` are paths (``list[]`` for each element) a backup must hold for a restore.
    """

    create: Write | None
    update: Write | None
    assign: Write | None = None
    nested: tuple[Write, ...] = ()
    read_only: tuple[str, ...] = ()
    create_only: tuple[str, ...] = ()
    create_inline: tuple[tuple[str, str], ...] = ()
    create_needs: tuple[str, ...] = ()
    create_requires: TemplateCheck | None = None
    builtin_writes: tuple[str, ...] = ()
    builtin_why: str = ""
    backup_needs: tuple[str, ...] = ()
    secrets: tuple[SecretRule, ...] = ()
    throttle: Throttle = "intune_write"

    @property
    def all(self) -> tuple[Write, ...]:
        return tuple(w for w in (self.create, self.update, self.assign, *self.nested) if w)


@dataclass(frozen=True)
class Contract:
    key: str
    path: str
    api_version: Literal["v1.0", "beta"] = "beta"
    method: Method = "GET"
    select: tuple[str, ...] = ()
    expand: tuple[str, ...] = ()
    paging: Paging = "next_link"
    page_size: int | None = None
    permissions: tuple[str, ...] = ()
    title: str = ""
    # Classification of the objects a policy collection returns.
    type_rules: tuple[TypeRule, ...] = ()
    default_policy_type: str | None = None
    default_platform: str | None = None
    platform_field: str | None = None
    builtin: BuiltinRule | None = None
    name_field: str = "displayName"
    modified_field: str | None = "lastModifiedDateTime"
    # How assignments are read: inline through $expand ("expand"), not at all ("none"), or the
    # key of a per-item collection contract.
    assignments: str = "none"
    details: tuple[Detail, ...] = ()
    # Fields that change without the policy changing; left out of content hashes and diffs.
    volatile_fields: tuple[str, ...] = ()
    # True for policy collections that inventory and backups read.
    policy: bool = False
    # Which of Graph's throttling budgets the call spends (see THROTTLE_BUDGETS).
    throttle: Throttle = "intune"
    parent: str | None = None
    # A policy collection's writes (restore); a write contract's own write.
    writes: WriteContract | None = None
    write: Write | None = None

    @property
    def is_item_read(self) -> bool:
        return "{id}" in self.path

    @property
    def per_item_reads(self) -> tuple[Detail, ...]:
        """Every read per listed object: the details, then the assignments when they have a
        contract of their own."""
        if self.assignments in CONTRACTS:
            return (*self.details, Detail("assignments", self.assignments, "collection"))
        return self.details

    def relative_url(
        self, item_id: str | None = None, *, top: int | None = None, where: str | None = None
    ) -> str:
        """The request path and query (without version root) for this contract; ``where`` an
        OData ``$filter`` expression (see :func:`odata_eq`)."""
        path = self.path.replace("{id}", _quote_id(item_id)) if self.is_item_read else self.path
        query: list[str] = []
        if where is not None:
            query.append("$filter=" + quote(where, safe="'"))
        if self.select:
            query.append("$select=" + ",".join(self.select))
        if self.expand:
            query.append("$expand=" + ",".join(self.expand))
        page = top if top is not None else self.page_size
        if page is not None and self.paging != "none" and self.paging != "delta":
            query.append(f"$top={page}")
        return path + ("?" + "&".join(query) if query else "")

    def write_path(self, item_id: str | None = None, sub_id: str | None = None) -> str:
        """A write contract's request path (without version root) for an object and, where
        the path names one, an element of its nested content."""
        path = self.path
        if "{id}" in path:
            path = path.replace("{id}", _quote_id(item_id))
        if "{sub_id}" in path:
            path = path.replace("{sub_id}", _quote_id(sub_id))
        return path


def odata_eq(field_name: str, value: str) -> str:
    """``field eq 'value'``, the value an OData string literal (a quote in it doubled)."""
    return f"{field_name} eq '{value.replace(chr(39), chr(39) * 2)}'"


# One path segment that names an item: never "." or "..", which would move up the path.
ITEM_ID = r"(?!\.\.?(?:/|$))[A-Za-z0-9_.:-]+"


def _quote_id(item_id: str | None) -> str:
    # Graph ids are GUIDs or GUID_suffix strings; refuse anything that could alter the path,
    # a "." or ".." segment included.
    if item_id is None or not re.fullmatch(ITEM_ID, item_id):
        raise ValueError(f"refusing to put {item_id!r} into a Graph path")
    return item_id


# Graph throttles per service: Intune allows 1,000 requests per 20 s per tenant and app; Entra ID
# (directory objects, conditional access) 3,500 per 10 s for the smallest tenants. A request unit
# is a request or a $batch sub-request. Values: (burst capacity, refill per second).
THROTTLE_BUDGETS: dict[str, tuple[float, float]] = {
    "intune": (1000.0, 1000.0 / 20.0),
    # Intune's writes (POST, PUT, PATCH, DELETE) have a budget of their own: 100 per 20 s per app
    # and tenant, 200 per tenant for all apps (Graph's service-specific throttling limits).
    "intune_write": (100.0, 100.0 / 20.0),
    "directory": (3500.0, 3500.0 / 10.0),
}

# Application permissions, least-privileged read variants.
CONFIG = "DeviceManagementConfiguration.Read.All"
SERVICE = "DeviceManagementServiceConfig.Read.All"
APPS = "DeviceManagementApps.Read.All"
RBAC = "DeviceManagementRBAC.Read.All"
DEVICES = "DeviceManagementManagedDevices.Read.All"
POLICY = "Policy.Read.All"
GROUPS = "GroupMember.Read.All"
USERS = "User.Read.All"
# Their ReadWrite variants, which writes need.
CONFIG_RW = "DeviceManagementConfiguration.ReadWrite.All"
SERVICE_RW = "DeviceManagementServiceConfig.ReadWrite.All"
APPS_RW = "DeviceManagementApps.ReadWrite.All"
RBAC_RW = "DeviceManagementRBAC.ReadWrite.All"
DEVICES_RW = "DeviceManagementManagedDevices.ReadWrite.All"

# Fields Graph changes on its own (versions, timestamps, OData bookkeeping).
COMMON_VOLATILE = (
    "@odata.context",
    "@odata.etag",
    "lastModifiedDateTime",
    "modifiedDateTime",
    "version",
    "settingCount",
)

A = "#microsoft.graph."


def _rules(platform_by_type: Mapping[str, tuple[str, str | None]]) -> tuple[TypeRule, ...]:
    return tuple(
        TypeRule(A + odata, policy, platform)
        for odata, (policy, platform) in platform_by_type.items()
    )


def _sub(key: str, path: str, permissions: tuple[str, ...], parent: str, **kw: Any) -> Contract:
    return Contract(key=key, path=path, permissions=permissions, parent=parent, **kw)


_DEVICE_CONFIGURATION_TYPES = {
    "windows10GeneralConfiguration": ("device_configuration", "windows"),
    "windows10EndpointProtectionConfiguration": ("device_configuration", "windows"),
    "windows10CustomConfiguration": ("device_configuration.custom_oma_uri", "windows"),
    "windowsUpdateForBusinessConfiguration": ("update_ring", "windows"),
    "windowsHealthMonitoringConfiguration": ("device_configuration", "windows"),
    "windowsDeliveryOptimizationConfiguration": ("device_configuration", "windows"),
    "windowsIdentityProtectionConfiguration": ("device_configuration", "windows"),
    "windows81TrustedRootCertificate": ("device_configuration", "windows"),
    "windowsWifiConfiguration": ("device_configuration", "windows"),
    "windows10VpnConfiguration": ("device_configuration", "windows"),
    "iosGeneralDeviceConfiguration": ("device_configuration", "ios"),
    "iosCustomConfiguration": ("device_configuration.custom_oma_uri", "ios"),
    "iosDeviceFeaturesConfiguration": ("device_configuration", "ios"),
    "iosUpdateConfiguration": ("update_ring", "ios"),
    "macOSGeneralDeviceConfiguration": ("device_configuration", "macos"),
    "macOSCustomConfiguration": ("device_configuration.custom_oma_uri", "macos"),
    "macOSDeviceFeaturesConfiguration": ("device_configuration", "macos"),
    "androidGeneralDeviceConfiguration": ("device_configuration", "android"),
    "androidCustomConfiguration": ("device_configuration.custom_oma_uri", "android"),
    "androidWorkProfileGeneralDeviceConfiguration": ("device_configuration", "android"),
    "androidWorkProfileCustomConfiguration": ("device_configuration.custom_oma_uri", "android"),
    "androidDeviceOwnerGeneralDeviceConfiguration": ("device_configuration", "android"),
}

_COMPLIANCE_TYPES = {
    "windows10CompliancePolicy": ("compliance_policy", "windows"),
    "windows81CompliancePolicy": ("compliance_policy", "windows"),
    "iosCompliancePolicy": ("compliance_policy", "ios"),
    "macOSCompliancePolicy": ("compliance_policy", "macos"),
    "androidCompliancePolicy": ("compliance_policy", "android"),
    "androidWorkProfileCompliancePolicy": ("compliance_policy", "android"),
    "androidDeviceOwnerCompliancePolicy": ("compliance_policy", "android"),
    "aospDeviceOwnerCompliancePolicy": ("compliance_policy", "android"),
}

# deviceEnrollmentConfigurations is one collection holding many kinds. Two of them differ by one
# letter (…Restriction vs …Restrictions), single-platform restrictions also carry the
# deviceEnrollmentConfigurationType "singlePlatformRestriction", and enrollment notifications reuse
# the collection with their own type.
_ENROLLMENT_TYPES = (
    TypeRule(A + "deviceEnrollmentLimitConfiguration", "enrollment.device_limit"),
    TypeRule(
        A + "deviceEnrollmentPlatformRestrictionsConfiguration", "enrollment.platform_restrictions"
    ),
    TypeRule(
        A + "deviceEnrollmentPlatformRestrictionConfiguration",
        "enrollment.single_platform_restriction",
    ),
    TypeRule(
        A + "deviceEnrollmentWindowsHelloForBusinessConfiguration",
        "enrollment.windows_hello_for_business",
        "windows",
    ),
    TypeRule(
        A + "windows10EnrollmentCompletionPageConfiguration",
        "enrollment.status_page",
        "windows",
    ),
    TypeRule(
        A + "deviceComanagementAuthorityConfiguration",
        "enrollment.comanagement_authority",
        "windows",
    ),
    TypeRule(
        A + "windowsRestoreDeviceEnrollmentConfiguration", "enrollment.windows_restore", "windows"
    ),
    TypeRule(A + "deviceEnrollmentNotificationConfiguration", "enrollment.notification"),
)

_APP_CONFIG_TYPES = {
    "iosMobileAppConfiguration": ("app_configuration.managed_devices", "ios"),
    "androidManagedStoreAppConfiguration": ("app_configuration.managed_devices", "android"),
}

_contracts: list[Contract] = [
    # --- Device configuration ------------------------------------------------------------
    Contract(
        key="device_configurations",
        title="Device configurations",
        path="/deviceManagement/deviceConfigurations",
        expand=("assignments",),
        page_size=100,
        permissions=(CONFIG,),
        type_rules=_rules(_DEVICE_CONFIGURATION_TYPES),
        default_policy_type="device_configuration",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="compliance_policies",
        title="Compliance policies",
        path="/deviceManagement/deviceCompliancePolicies",
        expand=(
            "assignments",
            "scheduledActionsForRule($expand=scheduledActionConfigurations)",
        ),
        page_size=100,
        permissions=(CONFIG,),
        type_rules=_rules(_COMPLIANCE_TYPES),
        default_policy_type="compliance_policy",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="settings_catalog",
        title="Settings catalog policies",
        path="/deviceManagement/configurationPolicies",
        select=(
            "id",
            "name",
            "description",
            "platforms",
            "technologies",
            "roleScopeTagIds",
            "templateReference",
            "createdDateTime",
            "lastModifiedDateTime",
            "settingCount",
        ),
        expand=("assignments",),
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="settings_catalog",
        platform_field="platforms",
        name_field="name",
        assignments="expand",
        details=(Detail("settings", "settings_catalog.settings"),),
        policy=True,
    ),
    _sub(
        "settings_catalog.settings",
        "/deviceManagement/configurationPolicies/{id}/settings",
        (CONFIG,),
        "settings_catalog",
        page_size=25,
        expand=("settingDefinitions",),
    ),
    Contract(
        key="group_policy_configurations",
        title="Administrative templates",
        path="/deviceManagement/groupPolicyConfigurations",
        expand=("assignments",),
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="administrative_template",
        default_platform="windows",
        assignments="expand",
        details=(Detail("definitionValues", "group_policy_configurations.definition_values"),),
        policy=True,
    ),
    _sub(
        "group_policy_configurations.definition_values",
        "/deviceManagement/groupPolicyConfigurations/{id}/definitionValues",
        (CONFIG,),
        "group_policy_configurations",
        expand=(
            "definition($select=id,displayName,classType,categoryPath)",
            "presentationValues($expand=presentation)",
        ),
        page_size=100,
    ),
    Contract(
        key="endpoint_security_intents",
        title="Endpoint security (intents)",
        path="/deviceManagement/intents",
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="endpoint_security_intent",
        default_platform="windows",
        assignments="endpoint_security_intents.assignments",
        details=(Detail("settings", "endpoint_security_intents.settings"),),
        policy=True,
    ),
    _sub(
        "endpoint_security_intents.settings",
        "/deviceManagement/intents/{id}/settings",
        (CONFIG,),
        "endpoint_security_intents",
        page_size=100,
    ),
    _sub(
        "endpoint_security_intents.assignments",
        "/deviceManagement/intents/{id}/assignments",
        (CONFIG,),
        "endpoint_security_intents",
    ),
    # The template an intent was made from: a restore reads it, because a deprecated template
    # creates no intents. Templates are Microsoft's, the same in every tenant.
    Contract(
        key="endpoint_security_templates.item",
        title="Endpoint security template",
        path="/deviceManagement/templates/{id}",
        select=("id", "displayName", "isDeprecated", "templateType", "templateSubtype"),
        paging="none",
        permissions=(CONFIG,),
        modified_field=None,
    ),
    Contract(
        key="autopilot_profiles",
        title="Autopilot deployment profiles",
        path="/deviceManagement/windowsAutopilotDeploymentProfiles",
        expand=("assignments",),
        page_size=100,
        permissions=(SERVICE,),
        type_rules=_rules(
            {
                "azureADWindowsAutopilotDeploymentProfile": ("autopilot_profile", "windows"),
                "activeDirectoryWindowsAutopilotDeploymentProfile": (
                    "autopilot_profile",
                    "windows",
                ),
            }
        ),
        default_policy_type="autopilot_profile",
        default_platform="windows",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="enrollment_configurations",
        title="Enrollment configurations",
        path="/deviceManagement/deviceEnrollmentConfigurations",
        expand=("assignments",),
        page_size=100,
        permissions=(SERVICE,),
        type_rules=_ENROLLMENT_TYPES,
        default_policy_type="enrollment",
        platform_field="platformType",
        builtin=BuiltinRule(
            id_suffixes=(
                "_DefaultLimit",
                "_DefaultPlatformRestrictions",
                "_DefaultWindowsHelloForBusiness",
                "_DefaultWindows10EnrollmentCompletionPageConfiguration",
                "_DefaultWindowsRestore",
                "_DefaultComanagementAuthority",
            ),
            field_equals=(("priority", 0),),
        ),
        assignments="expand",
        policy=True,
    ),
    # --- Apps -------------------------------------------------------------------------------
    Contract(
        key="app_protection_ios",
        title="App protection (iOS)",
        path="/deviceAppManagement/iosManagedAppProtections",
        expand=("assignments", "apps"),
        page_size=100,
        permissions=(APPS,),
        type_rules=_rules({"iosManagedAppProtection": ("app_protection", "ios")}),
        default_policy_type="app_protection",
        default_platform="ios",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="app_protection_android",
        title="App protection (Android)",
        path="/deviceAppManagement/androidManagedAppProtections",
        expand=("assignments", "apps"),
        page_size=100,
        permissions=(APPS,),
        type_rules=_rules({"androidManagedAppProtection": ("app_protection", "android")}),
        default_policy_type="app_protection",
        default_platform="android",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="app_protection_windows",
        title="App protection (Windows)",
        path="/deviceAppManagement/windowsManagedAppProtections",
        expand=("assignments", "apps"),
        page_size=100,
        permissions=(APPS,),
        type_rules=_rules({"windowsManagedAppProtection": ("app_protection", "windows")}),
        default_policy_type="app_protection",
        default_platform="windows",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="app_protection_mdm_wip",
        title="Windows Information Protection (MDM)",
        path="/deviceAppManagement/mdmWindowsInformationProtectionPolicies",
        expand=("assignments",),
        page_size=100,
        permissions=(APPS,),
        type_rules=_rules(
            {"mdmWindowsInformationProtectionPolicy": ("app_protection.mdm_wip", "windows")}
        ),
        default_policy_type="app_protection.mdm_wip",
        default_platform="windows",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="managed_app_configurations",
        title="App configuration (managed apps)",
        path="/deviceAppManagement/targetedManagedAppConfigurations",
        expand=("assignments", "apps"),
        page_size=100,
        permissions=(APPS,),
        default_policy_type="app_configuration.managed_apps",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="mobile_app_configurations",
        title="App configuration (managed devices)",
        path="/deviceAppManagement/mobileAppConfigurations",
        expand=("assignments",),
        page_size=100,
        permissions=(APPS,),
        type_rules=_rules(_APP_CONFIG_TYPES),
        default_policy_type="app_configuration.managed_devices",
        assignments="expand",
        policy=True,
    ),
    # --- Entra / conditional access --------------------------------------------------------
    Contract(
        key="conditional_access_policies",
        title="Conditional access policies",
        path="/identity/conditionalAccess/policies",
        api_version="v1.0",
        permissions=(POLICY,),
        default_policy_type="conditional_access",
        modified_field="modifiedDateTime",
        throttle="directory",
        policy=True,
    ),
    # The named locations conditional access policies name: read by a restore to map them into
    # the target tenant (by id, else by display name), not cached or backed up.
    Contract(
        key="named_locations",
        title="Named locations",
        path="/identity/conditionalAccess/namedLocations",
        api_version="v1.0",
        select=("id", "displayName"),
        permissions=(POLICY,),
        modified_field="modifiedDateTime",
        throttle="directory",
    ),
    # The users conditional access policies name: a restore looks each one up by id, and into
    # another tenant by display name (``$filter``), never listing the directory.
    Contract(
        key="users",
        title="Users",
        path="/users",
        api_version="v1.0",
        select=("id", "displayName", "userPrincipalName"),
        page_size=999,
        permissions=(USERS,),
        modified_field=None,
        throttle="directory",
    ),
    # --- Tenant administration --------------------------------------------------------------
    Contract(
        key="assignment_filters",
        title="Assignment filters",
        path="/deviceManagement/assignmentFilters",
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="assignment_filter",
        platform_field="platform",
        policy=True,
    ),
    Contract(
        key="scope_tags",
        title="Scope tags",
        path="/deviceManagement/roleScopeTags",
        expand=("assignments",),
        permissions=(RBAC,),
        default_policy_type="scope_tag",
        modified_field=None,
        assignments="expand",
        builtin=BuiltinRule(field_equals=(("isBuiltIn", True),)),
        policy=True,
    ),
    Contract(
        key="role_definitions",
        title="Role definitions",
        path="/deviceManagement/roleDefinitions",
        expand=("roleAssignments",),
        permissions=(RBAC,),
        default_policy_type="role_definition",
        modified_field=None,
        builtin=BuiltinRule(field_equals=(("isBuiltIn", True),)),
        policy=True,
    ),
    Contract(
        key="notification_templates",
        title="Compliance notification templates",
        path="/deviceManagement/notificationMessageTemplates",
        page_size=100,
        permissions=(SERVICE,),
        default_policy_type="notification_template",
        details=(
            Detail("localizedNotificationMessages", "notification_templates.localized_messages"),
        ),
        policy=True,
    ),
    _sub(
        "notification_templates.localized_messages",
        "/deviceManagement/notificationMessageTemplates/{id}/localizedNotificationMessages",
        (SERVICE,),
        "notification_templates",
    ),
    Contract(
        key="device_categories",
        title="Device categories",
        path="/deviceManagement/deviceCategories",
        permissions=(DEVICES,),
        default_policy_type="device_category",
        modified_field=None,
        policy=True,
    ),
    Contract(
        key="policy_sets",
        title="Policy sets",
        path="/deviceAppManagement/policySets",
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="policy_set",
        details=(Detail("item", "policy_sets.item", "merge"),),
        policy=True,
    ),
    _sub(
        "policy_sets.item",
        "/deviceAppManagement/policySets/{id}",
        (CONFIG,),
        "policy_sets",
        expand=("assignments", "items"),
        paging="none",
    ),
    # --- Scripts ---------------------------------------------------------------------------
    # Lists of scripts omit scriptContent; only a GET of each script returns it.
    Contract(
        key="powershell_scripts",
        title="PowerShell scripts",
        path="/deviceManagement/deviceManagementScripts",
        expand=("assignments",),
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="script.powershell",
        default_platform="windows",
        assignments="expand",
        details=(Detail("item", "powershell_scripts.item", "merge"),),
        policy=True,
    ),
    _sub(
        "powershell_scripts.item",
        "/deviceManagement/deviceManagementScripts/{id}",
        (CONFIG,),
        "powershell_scripts",
        paging="none",
    ),
    Contract(
        key="macos_shell_scripts",
        title="macOS shell scripts",
        path="/deviceManagement/deviceShellScripts",
        expand=("assignments",),
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="script.macos_shell",
        default_platform="macos",
        assignments="expand",
        details=(Detail("item", "macos_shell_scripts.item", "merge"),),
        policy=True,
    ),
    _sub(
        "macos_shell_scripts.item",
        "/deviceManagement/deviceShellScripts/{id}",
        (CONFIG,),
        "macos_shell_scripts",
        paging="none",
    ),
    Contract(
        key="device_health_scripts",
        title="Remediations (device health scripts)",
        path="/deviceManagement/deviceHealthScripts",
        expand=("assignments",),
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="script.remediation",
        default_platform="windows",
        assignments="expand",
        details=(Detail("item", "device_health_scripts.item", "merge"),),
        builtin=BuiltinRule(field_equals=(("isGlobalScript", True),)),
        policy=True,
    ),
    _sub(
        "device_health_scripts.item",
        "/deviceManagement/deviceHealthScripts/{id}",
        (CONFIG,),
        "device_health_scripts",
        paging="none",
    ),
    Contract(
        key="compliance_scripts",
        title="Compliance scripts",
        path="/deviceManagement/deviceComplianceScripts",
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="script.compliance",
        default_platform="windows",
        details=(Detail("item", "compliance_scripts.item", "merge"),),
        policy=True,
    ),
    _sub(
        "compliance_scripts.item",
        "/deviceManagement/deviceComplianceScripts/{id}",
        (CONFIG,),
        "compliance_scripts",
        paging="none",
    ),
    # --- Windows update profiles -----------------------------------------------------------
    Contract(
        key="feature_update_profiles",
        title="Feature update profiles",
        path="/deviceManagement/windowsFeatureUpdateProfiles",
        expand=("assignments",),
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="update_profile.feature",
        default_platform="windows",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="quality_update_profiles",
        title="Quality update profiles",
        path="/deviceManagement/windowsQualityUpdateProfiles",
        expand=("assignments",),
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="update_profile.quality",
        default_platform="windows",
        assignments="expand",
        policy=True,
    ),
    Contract(
        key="driver_update_profiles",
        title="Driver update profiles",
        path="/deviceManagement/windowsDriverUpdateProfiles",
        expand=("assignments",),
        page_size=100,
        permissions=(CONFIG,),
        default_policy_type="update_profile.driver",
        default_platform="windows",
        assignments="expand",
        policy=True,
    ),
    # --- Directory --------------------------------------------------------------------------
    Contract(
        key="groups_delta",
        title="Entra ID groups (delta)",
        path="/groups/delta",
        api_version="v1.0",
        paging="delta",
        page_size=200,
        select=(
            "id",
            "displayName",
            "description",
            "mail",
            "mailNickname",
            "securityEnabled",
            "mailEnabled",
            "groupTypes",
            "membershipRule",
            "createdDateTime",
        ),
        permissions=(GROUPS,),
        modified_field=None,
        throttle="directory",
    ),
    # --- Infrastructure ---------------------------------------------------------------------
    Contract(
        key="batch",
        title="JSON batching",
        path="/$batch",
        method="POST",
        paging="none",
        modified_field=None,
    ),
]

# --- Writes (restore) ------------------------------------------------------------------------
# How Microsoft writes each policy collection, from Graph's Intune and identity API pages and what
# peers do (IntuneCD's update modules, IntuneManagement's import, Microsoft365DSC). A success
# status is IntuneCD's where it checks for a particular one, else Microsoft's page's.

DM = "/deviceManagement"
DAM = "/deviceAppManagement"
# Fields Graph sets on every Intune object; a write never sends them.
SERVER_SET = ("id", "createdDateTime", "lastModifiedDateTime", "version")
# Creating or updating a conditional access policy takes three application permissions, not
# one: Graph's create and update pages list Policy.Read.All, Policy.ReadWrite.ConditionalAccess
# and Application.Read.All together (the update page flags a known permissions issue), and
# IntuneManagement asks for the same three.
CA_WRITE = ("Policy.ReadWrite.ConditionalAccess", "Policy.Read.All", "Application.Read.All")


def _create(path: str, permissions: tuple[str, ...], status: int = 201) -> Write:
    return Write("create", "POST", path, permissions, "create", status)


def _update(path: str, permissions: tuple[str, ...], status: int) -> Write:
    # PATCH changes only the top-level fields it names: nested content has writes of its own.
    return Write("update", "PATCH", path + "/{id}", permissions, "patch", status)


def _assign(
    path: str, permissions: tuple[str, ...], status: int, key: str = "assignments"
) -> Write:
    # Intune's assign actions replace the object's whole assignment set with the one sent.
    return Write(
        "assign", "POST", path + "/{id}/assign", permissions, "set", status, "assignments", key
    )


def _target_apps(path: str) -> Write:
    # The protected apps of an app protection or app configuration policy: POST .../targetApps
    # replaces them (as IntuneManagement's import does after creating the policy).
    return Write(
        "targetApps", "POST", path + "/{id}/targetApps", (APPS_RW,), "set", 204, "apps", "apps"
    )


def _standard(
    path: str,
    permissions: tuple[str, ...],
    *,
    update_status: int,
    assign_status: int | None = None,
    assign_key: str = "assignments",
    create_status: int = 201,
    **kw: Any,
) -> WriteContract:
    """Create (POST to the collection), update (PATCH) and, with an assign status, the assign
    action."""
    return WriteContract(
        create=_create(path, permissions, create_status),
        update=_update(path, permissions, update_status),
        assign=None
        if assign_status is None
        else _assign(path, permissions, assign_status, assign_key),
        read_only=SERVER_SET + kw.pop("read_only", ()),
        **kw,
    )


def _element_writes(
    path: str, source: str, permissions: tuple[str, ...], noun: str, add: int = 201
) -> tuple[Write, Write]:
    """Nested content written element by element: a POST to it adds one, a PATCH of one
    changes it."""
    return (
        Write(f"add{noun}", "POST", f"{path}/{{id}}/{source}", permissions, "append", add, source),
        Write(
            f"update{noun}",
            "PATCH",
            f"{path}/{{id}}/{source}/{{sub_id}}",
            permissions,
            "patch_element",
            200,
            source,
        ),
    )


def _config(collection: str, assign_key: str = "assignments", **kw: Any) -> WriteContract:
    """A device management collection whose PATCH and assign action answer 200."""
    return _standard(
        f"{DM}/{collection}",
        (CONFIG_RW,),
        update_status=200,
        assign_status=200,
        assign_key=assign_key,
        **kw,
    )


def _app_protection(collection: str) -> WriteContract:
    path = f"{DAM}/{collection}"
    return _standard(
        path,
        (APPS_RW,),
        update_status=204,
        assign_status=204,
        nested=(_target_apps(path),),
        read_only=("isAssigned", "deployedAppCount"),
    )


_WRITES: dict[str, WriteContract] = {
    "device_configurations": _standard(
        f"{DM}/deviceConfigurations",
        (CONFIG_RW,),
        update_status=204,
        assign_status=200,  # answers with the new assignment collection
        secrets=(
            # Encrypted OMA-URI values come back masked, flagged isEncrypted; only the function
            # getOmaSettingPlainTextValue returns them in plain text, and backups hold none.
            SecretRule(
                "value", (("isEncrypted", (True,)),), collection="omaSettings", name_field="omaUri"
            ),
            # The pre-shared key of a personal Wi-Fi network is not given back in a form that
            # could be written.
            SecretRule(
                "preSharedKey",
                (("wifiSecurityType", ("wpaPersonal", "wpa2Personal", "wep")),),
                name_field="ssid",
                odata_types=(A + "windowsWifiConfiguration",),
            ),
        ),
    ),
    "compliance_policies": _standard(
        f"{DM}/deviceCompliancePolicies",
        (CONFIG_RW,),
        update_status=204,
        assign_status=200,
        # Graph refuses a compliance policy without its scheduled actions (the block rule at
        # least), so a create carries them; later they change only through
        # scheduleActionsForRules, which replaces them.
        create_inline=(("scheduledActionsForRule", "scheduledActionsForRule"),),
        create_needs=("scheduledActionsForRule",),
        nested=(
            Write(
                "scheduleActionsForRules",
                "POST",
                f"{DM}/deviceCompliancePolicies/{{id}}/scheduleActionsForRules",
                (CONFIG_RW,),
                "set",
                200,  # Microsoft's page says 204; IntuneCD checks for 200
                "scheduledActionsForRule",
                "deviceComplianceScheduledActionForRules",
            ),
        ),
    ),
    "settings_catalog": _standard(
        f"{DM}/configurationPolicies",
        (CONFIG_RW,),
        update_status=200,
        assign_status=200,
        create_inline=(("settings", "settings"),),
        # PATCH changes only a policy's top-level fields; its settings are replaced by a PUT of
        # the whole policy, as the Intune portal, IntuneCD (PUT, 204) and IntuneManagement do.
        nested=(
            Write(
                "replace",
                "PUT",
                f"{DM}/configurationPolicies/{{id}}",
                (CONFIG_RW,),
                "replace",
                204,
                "settings",
                "settings",
            ),
        ),
        read_only=("settingCount", "isAssigned", "creationSource", "priorityMetaData"),
        secrets=(
            # Secret settings come back as an encryptedValueToken. The portal sends the token
            # back unchanged within the same tenant, but a backup cannot know that the token
            # still decrypts where it is written, so it is not written.
            SecretRule(
                "value",
                (
                    ("@odata.type", (A + "deviceManagementConfigurationSecretSettingValue",)),
                    ("valueState", ("encryptedValueToken",)),
                ),
                collection="settings",
                deep=True,
                name_field="settingDefinitionId",
            ),
        ),
    ),
    "group_policy_configurations": _standard(
        f"{DM}/groupPolicyConfigurations",
        (CONFIG_RW,),
        update_status=200,
        assign_status=200,
        # Definition values are written by updateDefinitionValues (added, updated, deletedIds),
        # each naming its ADMX definition ("definition@odata.bind") and each presentation value
        # its presentation ("presentation@odata.bind"); a backup without those references
        # cannot be written back.
        nested=(
            Write(
                "updateDefinitionValues",
                "POST",
                f"{DM}/groupPolicyConfigurations/{{id}}/updateDefinitionValues",
                (CONFIG_RW,),
                "delta",
                204,
                "definitionValues",
                delta_keys=("added", "updated", "deletedIds"),
                binds=(
                    ("definition", f"{DM}/groupPolicyDefinitions('{{id}}')"),
                    (
                        "presentation",
                        f"{DM}/groupPolicyDefinitions('{{definition}}')/presentations('{{id}}')",
                    ),
                ),
            ),
        ),
        read_only=("policyConfigurationIngestionType",),
        backup_needs=(
            "definitionValues[].definition.id",
            "definitionValues[].presentationValues[].presentation.id",
        ),
    ),
    "endpoint_security_intents": WriteContract(
        # An intent is created from its template (createInstance answers 200 with the intent),
        # and a deprecated template can no longer create one: existing intents can still be
        # edited, deleted ones cannot come back.
        create=Write(
            "create",
            "POST",
            f"{DM}/templates/{{id}}/createInstance",
            (CONFIG_RW,),
            "create",
            200,
            id_from="templateId",
        ),
        update=_update(f"{DM}/intents", (CONFIG_RW,), 200),
        assign=_assign(f"{DM}/intents", (CONFIG_RW,), 204),
        nested=(
            # updateSettings changes the settings it is given (by definition) and keeps the rest.
            Write(
                "updateSettings",
                "POST",
                f"{DM}/intents/{{id}}/updateSettings",
                (CONFIG_RW,),
                "merge",
                204,
                "settings",
                "settings",
                match_field="definitionId",
            ),
        ),
        create_inline=(("settings", "settingsDelta"),),
        create_requires=TemplateCheck(
            "endpoint_security_templates.item", "templateId", "isDeprecated", True
        ),
        read_only=(*SERVER_SET, "templateId", "isAssigned", "isMigratingToConfigurationPolicy"),
    ),
    "autopilot_profiles": WriteContract(
        create=_create(f"{DM}/windowsAutopilotDeploymentProfiles", (SERVICE_RW,)),
        update=_update(f"{DM}/windowsAutopilotDeploymentProfiles", (SERVICE_RW,), 200),
        # An Autopilot profile's assign action takes device ids, not groups: its group
        # assignments are created one per target and removed one by one (IntuneCD, 201).
        assign=Write(
            "assign",
            "POST",
            f"{DM}/windowsAutopilotDeploymentProfiles/{{id}}/assignments",
            (SERVICE_RW,),
            "append",
            201,
            "assignments",
        ),
        nested=(
            Write(
                "unassign",
                "DELETE",
                f"{DM}/windowsAutopilotDeploymentProfiles/{{id}}/assignments/{{sub_id}}",
                (SERVICE_RW,),
                "remove_element",
                200,
                "assignments",
            ),
        ),
        read_only=SERVER_SET,
        create_only=("managementServiceAppId",),
    ),
    "enrollment_configurations": _standard(
        f"{DM}/deviceEnrollmentConfigurations",
        (SERVICE_RW,),
        update_status=200,
        assign_status=200,
        assign_key="enrollmentConfigurationAssignments",
        # Priority is not patched: setPriority moves a configuration.
        nested=(
            Write(
                "setPriority",
                "POST",
                f"{DM}/deviceEnrollmentConfigurations/{{id}}/setPriority",
                (SERVICE_RW,),
                "field",
                200,
                "priority",
                "priority",
            ),
        ),
        read_only=("priority",),
        builtin_writes=("update",),
        builtin_why="a default enrollment configuration keeps priority 0 and its all-users "
        "assignment: it is updated, never created or assigned",
    ),
    "app_protection_ios": _app_protection("iosManagedAppProtections"),
    "app_protection_android": _app_protection("androidManagedAppProtections"),
    "app_protection_windows": _app_protection("windowsManagedAppProtections"),
    "app_protection_mdm_wip": _standard(
        f"{DAM}/mdmWindowsInformationProtectionPolicies",
        (APPS_RW,),
        update_status=204,
        assign_status=204,
        read_only=("isAssigned",),
    ),
    "managed_app_configurations": _standard(
        f"{DAM}/targetedManagedAppConfigurations",
        (APPS_RW,),
        update_status=204,
        assign_status=204,
        nested=(_target_apps(f"{DAM}/targetedManagedAppConfigurations"),),
        read_only=("isAssigned", "deployedAppCount"),
    ),
    "mobile_app_configurations": _standard(
        f"{DAM}/mobileAppConfigurations", (APPS_RW,), update_status=204, assign_status=200
    ),
    "conditional_access_policies": WriteContract(
        create=_create("/identity/conditionalAccess/policies", CA_WRITE),
        update=_update("/identity/conditionalAccess/policies", CA_WRITE, 204),
        # Graph leaves a new policy's modifiedDateTime null.
        read_only=("id", "createdDateTime", "modifiedDateTime"),
        throttle="directory",
    ),
    "assignment_filters": _standard(
        f"{DM}/assignmentFilters",
        (CONFIG_RW,),
        update_status=200,
        read_only=("payloads",),
        create_only=("platform",),
    ),
    "scope_tags": _standard(
        f"{DM}/roleScopeTags",
        (RBAC_RW,),
        update_status=200,
        assign_status=200,
        create_status=200,  # IntuneCD expects 200 from this create
        read_only=("isBuiltIn",),
        builtin_why="Intune's built-in Default scope tag cannot be changed",
    ),
    "role_definitions": _standard(
        f"{DM}/roleDefinitions",
        (RBAC_RW,),
        update_status=200,
        create_status=200,  # IntuneCD expects 200 from this create
        nested=_element_writes(
            f"{DM}/roleDefinitions", "roleAssignments", (RBAC_RW,), "RoleAssignment"
        ),
        read_only=("isBuiltIn", "isBuiltInRoleDefinition"),
        builtin_writes=("addRoleAssignment", "updateRoleAssignment"),
        builtin_why="a built-in Intune role cannot be changed, only assigned",
    ),
    "notification_templates": _standard(
        f"{DM}/notificationMessageTemplates",
        (SERVICE_RW,),
        update_status=200,
        create_status=200,  # IntuneCD expects 200 from this create
        nested=_element_writes(
            f"{DM}/notificationMessageTemplates",
            "localizedNotificationMessages",
            (SERVICE_RW,),
            "LocalizedMessage",
            add=200,  # IntuneCD checks for 200
        ),
        create_only=("defaultLocale",),
    ),
    "device_categories": _standard(f"{DM}/deviceCategories", (DEVICES_RW,), update_status=200),
    "policy_sets": WriteContract(
        create=_create(f"{DAM}/policySets", (CONFIG_RW,)),
        update=_update(f"{DAM}/policySets", (CONFIG_RW,), 200),
        # A policy set's items and assignments both change through its update action; its
        # assignments key replaces the set's assignments.
        assign=Write(
            "assign",
            "POST",
            f"{DAM}/policySets/{{id}}/update",
            (CONFIG_RW,),
            "set",
            204,
            "assignments",
            "assignments",
        ),
        nested=(
            Write(
                "updateItems",
                "POST",
                f"{DAM}/policySets/{{id}}/update",
                (CONFIG_RW,),
                "delta",
                204,
                "items",
                delta_keys=(
                    "addedPolicySetItems",
                    "updatedPolicySetItems",
                    "deletedPolicySetItems",
                ),
            ),
        ),
        create_inline=(("items", "items"),),
        read_only=(*SERVER_SET, "status", "errorCode"),
    ),
    # Scripts: PATCH takes scriptContent (base64) like any other field; each assign action
    # names its list after the script kind.
    "powershell_scripts": _config("deviceManagementScripts", "deviceManagementScriptAssignments"),
    "macos_shell_scripts": _config("deviceShellScripts", "deviceManagementScriptAssignments"),
    "device_health_scripts": _config(
        "deviceHealthScripts",
        "deviceHealthScriptAssignments",  # each assignment carries its run schedule
        read_only=("isGlobalScript", "highestAvailableVersion"),
        builtin_writes=("assign",),
        builtin_why="a remediation Microsoft publishes cannot be edited, only assigned",
    ),
    "compliance_scripts": _standard(
        f"{DM}/deviceComplianceScripts", (CONFIG_RW,), update_status=200
    ),
    # Windows update profiles: what Graph computes from the update is not written.
    "feature_update_profiles": _config(
        "windowsFeatureUpdateProfiles",
        read_only=("deployableContentDisplayName", "endOfSupportDate"),
    ),
    "quality_update_profiles": _config(
        "windowsQualityUpdateProfiles",
        read_only=("releaseDateDisplayName", "deployableContentDisplayName"),
    ),
    "driver_update_profiles": _config(
        "windowsDriverUpdateProfiles",
        read_only=("newUpdates", "deviceReporting", "inventorySyncStatus"),
    ),
}


def _with_writes(contract: Contract) -> Contract:
    return replace(contract, writes=_WRITES[contract.key]) if contract.key in _WRITES else contract


def _write_contracts(policy: Contract) -> list[Contract]:
    """One contract per write of a policy collection: what the GraphClient may send and the
    simulator answers."""
    assert policy.writes is not None
    return [
        Contract(
            key=f"{policy.key}.{write.name}",
            title=f"{policy.title}: {write.name}",
            path=write.path,
            api_version=policy.api_version,
            method=write.method,
            paging="none",
            permissions=write.permissions,
            modified_field=None,
            throttle=policy.writes.throttle,
            parent=policy.key,
            write=write,
        )
        for write in policy.writes.all
    ]


def _object_read(policy: Contract) -> Contract:
    """One object of a collection by id, as its listing returns it (a restore re-reads its
    target before the first write and reads it back after the last)."""
    return Contract(
        key=f"{policy.key}.get",
        title=f"{policy.title}: one object",
        path=policy.path + "/{id}",
        api_version=policy.api_version,
        select=policy.select,
        expand=policy.expand,
        paging="none",
        permissions=policy.permissions,
        modified_field=None,
        throttle=policy.throttle,
        parent=policy.key,
    )


_contracts = [_with_writes(c) for c in _contracts]
# Collections besides the writable ones that are read one object at a time (users.get).
_READ_BY_ID = ("users",)
_contracts += [_object_read(c) for c in _contracts if c.writes or c.key in _READ_BY_ID]
_write_contract_list = [w for c in _contracts if c.writes for w in _write_contracts(c)]

CONTRACTS: dict[str, Contract] = {c.key: c for c in (*_contracts, *_write_contract_list)}
if len(CONTRACTS) != len(_contracts) + len(_write_contract_list):  # pragma: no cover
    raise RuntimeError("duplicate contract key in graph_contracts")

POLICY_CONTRACTS: tuple[str, ...] = tuple(c.key for c in _contracts if c.policy)
WRITE_CONTRACTS: tuple[str, ...] = tuple(c.key for c in _write_contract_list)
BATCH_SIZE = 20


# --- Pure helpers over the registry -------------------------------------------------------


@dataclass(frozen=True)
class Classified:
    policy_type: str
    platform: str | None
    builtin: bool


def classify(contract: Contract, obj: Mapping[str, Any]) -> Classified:
    """Classify one object returned by ``contract`` by its ``@odata.type`` and fields."""
    odata_type = obj.get("@odata.type")
    policy_type, platform = contract.default_policy_type or contract.key, contract.default_platform
    rule = next((r for r in contract.type_rules if r.odata_type == odata_type), None)
    if rule is not None:
        policy_type, platform = rule.policy_type, rule.platform or platform
    if contract.platform_field and obj.get(contract.platform_field):
        platform = _normalise_platform(obj[contract.platform_field])
    return Classified(policy_type, platform, is_builtin(contract, obj))


def is_builtin(contract: Contract, obj: Mapping[str, Any]) -> bool:
    """Built-in defaults are known by an id suffix (enrollment defaults are
    ``<tenant>_DefaultLimit`` …) or by a field Graph sets on them (``isBuiltIn``, priority 0)."""
    rule = contract.builtin
    if rule is None:
        return False
    if any(str(obj.get("id", "")).endswith(s) for s in rule.id_suffixes):
        return True
    return bool(rule.field_equals) and all(obj.get(f) == v for f, v in rule.field_equals)


_PLATFORMS = {
    "windows10": "windows",
    "windows": "windows",
    "windows10andlater": "windows",
    "ios": "ios",
    "ipados": "ios",
    "macos": "macos",
    # enrollmentRestrictionPlatformType spells macOS "mac".
    "mac": "macos",
    "android": "android",
    "androidforwork": "android",
    "androidworkprofile": "android",
    "androidaosp": "android",
    # Other documented spellings: settings catalog (windows10X, androidEnterprise, aosp) and
    # assignment filters (windows81AndLater, the MAM platforms).
    "windows10x": "windows",
    "windows81andlater": "windows",
    "windowsmobileapplicationmanagement": "windows",
    "iosmobileapplicationmanagement": "ios",
    "androidenterprise": "android",
    "aosp": "android",
    "androidmobileapplicationmanagement": "android",
    "linux": "linux",
    "allplatforms": "all",
}


def _normalise_platform(value: Any) -> str:
    first = str(value).split(",")[0].strip()
    return _PLATFORMS.get(first.lower(), first.lower())


def object_name(contract: Contract, obj: Mapping[str, Any]) -> str | None:
    value = obj.get(contract.name_field)
    return None if value is None else str(value)


def object_modified(contract: Contract, obj: Mapping[str, Any]) -> str | None:
    if contract.modified_field is None:
        return None
    value = obj.get(contract.modified_field)
    return None if value is None else str(value)


def extract_assignments(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten an object's ``assignments`` into rows of target type, group, filter and intent.

    Intune assignment targets carry the group and filter; the intent lives on the assignment
    (``intent`` for apps, implied ``exclude`` by the exclusion target type otherwise).
    """
    rows = []
    for assignment in obj.get("assignments") or ():
        target = assignment.get("target") or {}
        odata_type = str(target.get("@odata.type", ""))
        target_type = odata_type.removeprefix(A).removesuffix("AssignmentTarget") or "unknown"
        intent = assignment.get("intent")
        if intent is None:
            intent = "exclude" if "exclusion" in target_type.lower() else "include"
        filter_type = target.get("deviceAndAppManagementAssignmentFilterType")
        rows.append(
            {
                "target_type": target_type,
                "group_id": target.get("groupId"),
                "filter_id": target.get("deviceAndAppManagementAssignmentFilterId"),
                "filter_type": None if filter_type in (None, "none") else filter_type,
                "intent": str(intent),
            }
        )
    return rows


# Arrays whose order Graph does not promise (sets in all but syntax): sorted before hashing and
# diffing, so a reordered response is not a change.
UNORDERED_ARRAYS = frozenset(
    {
        "assignments",
        "roleScopeTagIds",
        "apps",
        "scheduledActionsForRule",
        "scheduledActionConfigurations",
        "settings",
        "definitionValues",
        "presentationValues",
        "localizedNotificationMessages",
        "items",
        "groupTypes",
        "roleAssignments",
        "notificationMessageCCList",
    }
)


def stable_payload(contract: Contract, obj: Any, *, top: bool = True) -> Any:
    """The object without what Graph changes on its own: volatile top-level fields, OData
    bookkeeping (except ``@odata.type``), and the order of unordered arrays."""
    if isinstance(obj, dict):
        volatile = set(COMMON_VOLATILE) | set(contract.volatile_fields) if top else set()
        out = {}
        for key, value in obj.items():
            # Property annotations (``assignments@odata.context`` on an $expand) are bookkeeping
            # too, and carry the Graph host.
            if key in volatile or ("@odata." in key and not key.endswith("@odata.type")):
                continue
            value = stable_payload(contract, value, top=False)
            if key in UNORDERED_ARRAYS and isinstance(value, list):
                value = sorted(value, key=canonical_json)
            out[key] = value
        return out
    if isinstance(obj, list):
        return [stable_payload(contract, v, top=False) for v in obj]
    return obj


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(contract: Contract, obj: Mapping[str, Any]) -> str:
    """Change detection: equal hashes mean no change a person would care about."""
    return hashlib.sha256(canonical_json(stable_payload(contract, obj)).encode()).hexdigest()


def missing_permissions(required: Iterable[str], roles: Iterable[str]) -> list[str]:
    """The required permissions that ``roles`` does not grant (ReadWrite implies Read)."""
    have = set(roles)
    missing = []
    for permission in required:
        read_write = permission.replace(".Read.", ".ReadWrite.")
        if permission not in have and read_write not in have:
            missing.append(permission)
    return missing


def all_permissions() -> tuple[str, ...]:
    """Every permission the reads need (what a read-only app registration is granted)."""
    return tuple(sorted({p for c in _contracts for p in c.permissions}))


def write_permissions() -> tuple[str, ...]:
    """Every permission the writes need (what a restore needs granted besides the reads)."""
    return tuple(sorted({p for c in _write_contract_list for p in c.permissions}))


# --- Restore rules over the write contracts --------------------------------------------------


def policy_writes(contract: Contract) -> WriteContract:
    """A policy collection's writes (ValueError for a contract Graph takes no writes of)."""
    if contract.writes is None:
        raise ValueError(f"{contract.key} is not a policy collection with writes")
    return contract.writes


def allowed_writes(contract: Contract, obj: Mapping[str, Any]) -> tuple[Write, ...]:
    """The writes Graph takes for this object: all of its collection's, or for a built-in object
    only those named in ``builtin_writes`` (a built-in object is never created)."""
    writes = policy_writes(contract)
    if not is_builtin(contract, obj):
        return writes.all
    return tuple(w for w in writes.all if w.name in writes.builtin_writes)


def _secret_names(value: Any, rule: SecretRule, name: str | None) -> Iterable[str]:
    if isinstance(value, list):
        for element in value if rule.deep else ():
            yield from _secret_names(element, rule, name)
        return
    if not isinstance(value, Mapping):
        return
    if rule.name_field and value.get(rule.name_field):
        name = str(value[rule.name_field])
    if all(value.get(field) in allowed for field, allowed in rule.when):
        yield f"{rule.field} of {name}" if name else rule.field
    for nested in value.values() if rule.deep else ():
        yield from _secret_names(nested, rule, name)


def masked_secrets(contract: Contract, obj: Mapping[str, Any]) -> list[str]:
    """The settings of ``obj`` whose secret values Graph returned masked, by name."""
    found: list[str] = []
    for rule in policy_writes(contract).secrets:
        if rule.odata_types and obj.get("@odata.type") not in rule.odata_types:
            continue
        roots = [obj] if rule.collection is None else list(obj.get(rule.collection) or ())
        for root in roots:
            found.extend(_secret_names(root, rule, None))
    return found


def _holds(value: Any, parts: list[str]) -> bool:
    if not parts:
        return value is not None
    if not isinstance(value, Mapping):
        return False
    head, rest = parts[0], parts[1:]
    if head.endswith("[]"):
        elements = value.get(head[:-2]) or []
        return isinstance(elements, list) and all(_holds(e, rest) for e in elements)
    return _holds(value.get(head), rest)


def missing_backup_refs(contract: Contract, obj: Mapping[str, Any]) -> list[str]:
    """The ``backup_needs`` paths a backed-up object does not hold."""
    return [p for p in policy_writes(contract).backup_needs if not _holds(obj, p.split("."))]


def restore_skip(contract: Contract, obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why a backed-up object cannot be restored at all — its reason code and a message — or
    None. (A create from a deprecated template is refused too; that needs the template, read
    live through the contract its ``create_requires`` names.)"""
    writes = policy_writes(contract)
    if not allowed_writes(contract, obj):
        return RESTORE_UNSUPPORTED, writes.builtin_why
    secrets = masked_secrets(contract, obj)
    if secrets:
        return (
            RESTORE_SECRET_UNAVAILABLE,
            f"Graph returns the secret {', '.join(secrets)} masked, and a mask is never "
            "written back",
        )
    missing = missing_backup_refs(contract, obj)
    if missing:
        return (
            RESTORE_UNSUPPORTED,
            f"the backup lacks {', '.join(missing)}, which Graph needs to write it back",
        )
    return None


__all__ = [
    "BATCH_SIZE",
    "CONTRACTS",
    "POLICY_CONTRACTS",
    "WRITE_CONTRACTS",
    "BuiltinRule",
    "Classified",
    "Contract",
    "Detail",
    "SecretRule",
    "TemplateCheck",
    "THROTTLE_BUDGETS",
    "TypeRule",
    "Write",
    "WriteContract",
    "all_permissions",
    "allowed_writes",
    "canonical_json",
    "classify",
    "content_hash",
    "extract_assignments",
    "is_builtin",
    "masked_secrets",
    "missing_backup_refs",
    "missing_permissions",
    "object_modified",
    "object_name",
    "policy_writes",
    "restore_skip",
    "stable_payload",
    "write_permissions",
]
