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
from dataclasses import dataclass
from typing import Any, Literal

Paging = Literal["none", "next_link", "delta"]
DetailMode = Literal["collection", "merge"]


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
class Contract:
    key: str
    path: str
    api_version: Literal["v1.0", "beta"] = "beta"
    method: Literal["GET", "POST"] = "GET"
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
    throttle: Literal["intune", "directory"] = "intune"
    parent: str | None = None

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

    def relative_url(self, item_id: str | None = None, *, top: int | None = None) -> str:
        """The request path and query (without version root) for this contract."""
        path = self.path.replace("{id}", _quote_id(item_id)) if self.is_item_read else self.path
        query: list[str] = []
        if self.select:
            query.append("$select=" + ",".join(self.select))
        if self.expand:
            query.append("$expand=" + ",".join(self.expand))
        page = top if top is not None else self.page_size
        if page is not None and self.paging != "none" and self.paging != "delta":
            query.append(f"$top={page}")
        return path + ("?" + "&".join(query) if query else "")


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
        expand=("definition($select=id,displayName,classType,categoryPath)", "presentationValues"),
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

CONTRACTS: dict[str, Contract] = {c.key: c for c in _contracts}
if len(CONTRACTS) != len(_contracts):  # pragma: no cover - guards the literal above
    raise RuntimeError("duplicate contract key in graph_contracts")

POLICY_CONTRACTS: tuple[str, ...] = tuple(c.key for c in _contracts if c.policy)
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


def granted(required: Iterable[str], roles: Iterable[str]) -> list[str]:
    """The required permissions that ``roles`` does not grant (ReadWrite implies Read)."""
    have = set(roles)
    missing = []
    for permission in required:
        read_write = permission.replace(".Read.", ".ReadWrite.")
        if permission not in have and read_write not in have:
            missing.append(permission)
    return missing


def all_permissions() -> tuple[str, ...]:
    return tuple(sorted({p for c in _contracts for p in c.permissions}))


__all__ = [
    "BATCH_SIZE",
    "CONTRACTS",
    "POLICY_CONTRACTS",
    "BuiltinRule",
    "Classified",
    "Contract",
    "Detail",
    "THROTTLE_BUDGETS",
    "TypeRule",
    "all_permissions",
    "canonical_json",
    "classify",
    "content_hash",
    "extract_assignments",
    "granted",
    "is_builtin",
    "object_modified",
    "object_name",
    "stable_payload",
]
