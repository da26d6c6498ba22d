"""Realistic Intune and Entra objects for the simulated tenant, one factory per policy contract.

Objects are stored in their full form: every property, with navigation properties (assignments,
settings, definition values, …) inline; :mod:`atlas_dagster.simulator.odata` shapes them into
what a request asks for. ``@odata.type`` families follow the contract registry's TypeRules.
"""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from graph_contracts import CONTRACTS

G = "#microsoft.graph."
EPOCH = datetime(2024, 1, 8, 9, 0, tzinfo=UTC)
ALL_DEVICES_ID = "adadadad-808e-44e2-905a-0b7873a8a531"
ALL_USERS_ID = "acacacac-9df4-4c7d-9d50-4ef0226f57a9"


def guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"


@dataclass
class Ctx:
    """What a factory may draw on: randomness, the tenant's groups and filters, and a clock."""

    rng: random.Random
    tenant_prefix: str
    pick_group: Callable[[random.Random], str]
    filter_ids: Callable[[], Sequence[str]]
    policy_ids: Callable[[str], Sequence[str]]

    def dates(self) -> dict[str, str]:
        created = EPOCH + timedelta(minutes=self.rng.randrange(0, 60 * 24 * 180))
        modified = created + timedelta(minutes=self.rng.randrange(0, 60 * 24 * 30))
        return {"createdDateTime": stamp(created), "lastModifiedDateTime": stamp(modified)}


_WORDS = (
    "Baseline", "Corporate", "Kiosk", "BYOD", "Finance", "Sales", "Pilot", "Ring 1", "Ring 2",
    "Executives", "Shared devices", "Frontline", "Developers", "Contractors", "Lab", "Legacy",
)  # fmt: skip
_PREFIX = ("WIN", "iOS", "MAC", "AND", "ALL", "CORP")


def policy_name(ctx: Ctx, kind: str) -> str:
    # A small vocabulary on purpose: real tenants reuse names, so some policies share one.
    rng = ctx.rng
    return f"{rng.choice(_PREFIX)} - {kind} - {rng.choice(_WORDS)}"


# --- Assignments -------------------------------------------------------------------------------

_ASSIGNMENT_TYPE = {
    "device_configurations": "deviceConfigurationAssignment",
    "compliance_policies": "deviceCompliancePolicyAssignment",
    "settings_catalog": "deviceManagementConfigurationPolicyAssignment",
    "group_policy_configurations": "groupPolicyConfigurationAssignment",
    "endpoint_security_intents": "deviceManagementIntentAssignment",
    "autopilot_profiles": "windowsAutopilotDeploymentProfileAssignment",
    "enrollment_configurations": "enrollmentConfigurationAssignment",
    "app_protection_ios": "targetedManagedAppPolicyAssignment",
    "app_protection_android": "targetedManagedAppPolicyAssignment",
    "app_protection_windows": "targetedManagedAppPolicyAssignment",
    "app_protection_mdm_wip": "targetedManagedAppPolicyAssignment",
    "managed_app_configurations": "targetedManagedAppPolicyAssignment",
    "mobile_app_configurations": "managedDeviceMobileAppConfigurationAssignment",
    "scope_tags": "roleScopeTagAutoAssignment",
    "policy_sets": "policySetAssignment",
    "powershell_scripts": "deviceManagementScriptAssignment",
    "macos_shell_scripts": "deviceManagementScriptAssignment",
    "device_health_scripts": "deviceHealthScriptAssignment",
    "feature_update_profiles": "windowsFeatureUpdateProfileAssignment",
    "quality_update_profiles": "windowsQualityUpdateProfileAssignment",
    "driver_update_profiles": "windowsDriverUpdateProfileAssignment",
}
# Which targets each family accepts: Intune refuses "all users/devices" for app protection,
# update profiles and scope tags, and filters for a few types.
_GROUPS_ONLY = {
    "app_protection_ios",
    "app_protection_android",
    "app_protection_windows",
    "app_protection_mdm_wip",
    "managed_app_configurations",
    "scope_tags",
    "policy_sets",
    "feature_update_profiles",
    "quality_update_profiles",
    "driver_update_profiles",
}
_NO_FILTERS = {
    "scope_tags",
    "policy_sets",
    "autopilot_profiles",
    "group_policy_configurations",
    "endpoint_security_intents",
    "feature_update_profiles",
    "quality_update_profiles",
    "driver_update_profiles",
    "app_protection_mdm_wip",
}


def supports_assignments(contract_key: str) -> bool:
    return contract_key in _ASSIGNMENT_TYPE


def make_target(ctx: Ctx, contract_key: str, kind: str) -> dict[str, Any]:
    rng = ctx.rng
    target: dict[str, Any] = {"@odata.type": G + kind + "AssignmentTarget"}
    filters = () if contract_key in _NO_FILTERS else ctx.filter_ids()
    if kind != "exclusionGroup" and filters and rng.random() < 0.3:
        target["deviceAndAppManagementAssignmentFilterId"] = rng.choice(list(filters))
        target["deviceAndAppManagementAssignmentFilterType"] = rng.choice(("include", "exclude"))
    else:
        target["deviceAndAppManagementAssignmentFilterId"] = None
        target["deviceAndAppManagementAssignmentFilterType"] = "none"
    if kind in ("group", "exclusionGroup"):
        target["groupId"] = ctx.pick_group(rng)
    return target


def make_assignments(ctx: Ctx, contract_key: str, policy_id: str) -> list[dict[str, Any]]:
    """Zero to four assignments with distinct targets, as Intune keeps them."""
    rng = ctx.rng
    kinds = ["group", "group", "exclusionGroup"]
    if contract_key not in _GROUPS_ONLY:
        kinds += ["allDevices", "allLicensedUsers"]
    out = []
    used: set[str] = set()
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4))):
        target = make_target(ctx, contract_key, rng.choice(kinds))
        key = target.get("groupId") or target["@odata.type"]
        if key in used:
            continue
        used.add(key)
        out.append(make_assignment(contract_key, policy_id, target))
    return out


def make_assignment(contract_key: str, policy_id: str, target: dict[str, Any]) -> dict[str, Any]:
    kind = target["@odata.type"]
    suffix = target.get("groupId") or (ALL_DEVICES_ID if "allDevices" in kind else ALL_USERS_ID)
    assignment: dict[str, Any] = {
        "@odata.type": G + _ASSIGNMENT_TYPE[contract_key],
        "id": f"{policy_id}_{suffix}",
    }
    if contract_key in ("device_configurations", "settings_catalog", "compliance_policies"):
        assignment.update(source="direct", sourceId=policy_id)
    assignment["target"] = target
    return assignment


# --- Factories ------------------------------------------------------------------------------------


def _base(ctx: Ctx, odata: str, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "@odata.type": G + odata,
        "id": guid(ctx.rng),
        "displayName": name,
        "description": ctx.rng.choice(("", "Managed by the platform team", "Do not edit")),
        **ctx.dates(),
        "roleScopeTagIds": ["0"],
        **extra,
    }


_DEVICE_CONFIG_FIELDS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "windows10GeneralConfiguration": lambda r: {
        "passwordRequired": r.random() < 0.5,
        "passwordMinimumLength": r.choice((6, 8, 12)),
        "defenderRequireRealTimeMonitoring": True,
        "cameraBlocked": r.random() < 0.2,
    },
    "windowsUpdateForBusinessConfiguration": lambda r: {
        "qualityUpdatesDeferralPeriodInDays": r.choice((0, 3, 7)),
        "featureUpdatesDeferralPeriodInDays": r.choice((0, 30, 90)),
        "automaticUpdateMode": "autoInstallAtMaintenanceTime",
        "businessReadyUpdatesOnly": "userDefined",
        "deadlineForQualityUpdatesInDays": r.choice((2, 3, 7)),
    },
    "iosUpdateConfiguration": lambda r: {
        "activeHoursStart": "08:00:00.0000000",
        "activeHoursEnd": "17:00:00.0000000",
        "scheduledInstallDays": ["monday", "wednesday"],
    },
    "iosGeneralDeviceConfiguration": lambda r: {
        "passcodeRequired": True,
        "passcodeMinimumLength": r.choice((4, 6)),
    },
    "macOSGeneralDeviceConfiguration": lambda r: {"passwordRequired": r.random() < 0.7},
    "androidWorkProfileGeneralDeviceConfiguration": lambda r: {
        "workProfileBlockCamera": r.random() < 0.3
    },
}


def _oma_settings(r: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "@odata.type": G + r.choice(("omaSettingString", "omaSettingInteger")),
            "displayName": f"Custom setting {n}",
            "description": None,
            "omaUri": f"./Device/Vendor/MSFT/Policy/Config/Custom/Setting{n}",
            "value": str(r.randrange(0, 10)),
        }
        for n in range(1, r.randrange(2, 5))
    ]


def device_configuration(ctx: Ctx) -> dict[str, Any]:
    rule = ctx.rng.choice(CONTRACTS["device_configurations"].type_rules)
    odata, policy_type = rule.odata_type.removeprefix(G), rule.policy_type
    obj = _base(ctx, odata, policy_name(ctx, policy_type.replace("_", " ")), version=1)
    obj.update(_DEVICE_CONFIG_FIELDS.get(odata, lambda r: {})(ctx.rng))
    if policy_type.endswith("custom_oma_uri"):
        obj["omaSettings"] = _oma_settings(ctx.rng)
    return obj


def compliance_policy(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    odata = r.choice(CONTRACTS["compliance_policies"].type_rules).odata_type.removeprefix(G)
    obj = _base(ctx, odata, policy_name(ctx, "Compliance"), version=r.randrange(1, 5))
    obj.update(passwordRequired=r.random() < 0.8, osMinimumVersion=r.choice((None, "10.0.19045")))
    actions = [
        {
            "id": guid(r),
            "gracePeriodHours": hours,
            "actionType": action,
            "notificationTemplateId": "00000000-0000-0000-0000-000000000000",
            "notificationMessageCCList": [],
        }
        for action, hours in (("block", 0), ("notification", r.choice((24, 72))))
        if action == "block" or r.random() < 0.5
    ]
    obj["scheduledActionsForRule"] = [
        {"id": guid(r), "ruleName": "PasswordRequired", "scheduledActionConfigurations": actions}
    ]
    return obj


_SETTING_DEFINITIONS = (
    "device_vendor_msft_policy_config_defender_allowrealtimemonitoring",
    "device_vendor_msft_policy_config_browser_allowpasswordmanager",
    "device_vendor_msft_bitlocker_requiredeviceencryption",
    "device_vendor_msft_policy_config_update_activehoursstart",
    "device_vendor_msft_policy_config_devicelock_devicepasswordenabled",
    "com.apple.security.firewall_enablefirewall",
    "device_vendor_msft_laps_policies_backupdirectory",
    "user_vendor_msft_policy_config_edge_homepagelocation",
)


def setting_definition(definition: str) -> dict[str, Any]:
    """A settings catalog definition: Microsoft's, the same in every tenant, so it follows from
    its id alone (a written setting is returned with it, as Graph expands it)."""
    return {
        "@odata.type": G + "deviceManagementConfigurationChoiceSettingDefinition",
        "id": definition,
        "name": definition.rsplit("_", 2)[-2],
        "displayName": definition.replace("_", " ").title(),
        "baseUri": "./Device/Vendor/MSFT/Policy",
        "offsetUri": "/Config/" + definition.rsplit("_", 2)[-2],
        "version": "1",
        "options": [
            {"itemId": f"{definition}_0", "displayName": "Disabled", "optionValue": None},
            {"itemId": f"{definition}_1", "displayName": "Enabled", "optionValue": None},
        ],
    }


def catalog_setting(r: random.Random, n: int) -> dict[str, Any]:
    definition = f"{r.choice(_SETTING_DEFINITIONS)}_{n}"
    return {
        "@odata.type": G + "deviceManagementConfigurationSetting",
        "id": str(n),
        "settingInstance": {
            "@odata.type": G + "deviceManagementConfigurationChoiceSettingInstance",
            "settingDefinitionId": definition,
            "settingInstanceTemplateReference": None,
            "choiceSettingValue": {
                "settingValueTemplateReference": None,
                "value": f"{definition}_{r.choice((0, 1))}",
                "children": [],
            },
        },
        "settingDefinitions": [setting_definition(definition)],
    }


def settings_catalog(ctx: Ctx, setting_range: tuple[int, int]) -> dict[str, Any]:
    r = ctx.rng
    count = r.randint(*setting_range)
    platform = r.choice(("windows10", "macOS", "iOS", "windows10"))
    obj = {
        "@odata.type": G + "deviceManagementConfigurationPolicy",
        "id": guid(r),
        "name": policy_name(ctx, "Settings catalog"),
        "description": r.choice(("", "Security baseline overrides")),
        "platforms": platform,
        "technologies": "mdm",
        "roleScopeTagIds": ["0"],
        "templateReference": {
            "templateId": "",
            "templateFamily": "none",
            "templateDisplayName": None,
            "templateDisplayVersion": None,
        },
        **ctx.dates(),
        "settingCount": count,
        "creationSource": None,
        "isAssigned": False,
        "priorityMetaData": None,
    }
    obj["settings"] = [catalog_setting(r, n) for n in range(count)]
    return obj


# Microsoft's ADMX catalogue is global: every definition the simulator generates, in any tenant,
# and every presentation of one, can be bound by a write in every simulated tenant.
ADMX_DEFINITIONS: dict[str, dict[str, Any]] = {}
ADMX_PRESENTATIONS: dict[str, dict[str, Any]] = {}


def admx_presentation(definition_id: str) -> dict[str, Any]:
    """The text box a definition shows for its value. Its id follows from the definition's, not
    from the tenant's randomness, so every seeded tenant draws what it drew before it had one."""
    key = f"groupPolicyDefinitions('{definition_id}')/presentations"
    return {
        "@odata.type": G + "groupPolicyPresentationTextBox",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, key)),
        "label": "Value",
        "lastModifiedDateTime": stamp(EPOCH),
        "defaultValue": "",
        "required": False,
        "maxLength": 1023,
    }


def group_policy_configuration(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, "groupPolicyConfiguration", policy_name(ctx, "Administrative template"))
    obj["policyConfigurationIngestionType"] = "builtIn"
    values = []
    for n in range(r.randrange(1, 6)):
        definition_id = guid(r)
        definition = {
            "id": definition_id,
            "displayName": f"Administrative setting {n}",
            "classType": r.choice(("machine", "user")),
            "categoryPath": r.choice(
                ("\\Windows Components\\OneDrive", "\\Microsoft Edge", "\\System\\Logon")
            ),
            "explainText": "Explains the setting.",
            "supportedOn": "At least Windows 10",
        }
        ADMX_DEFINITIONS[definition_id] = definition
        presentation = admx_presentation(definition_id)
        ADMX_PRESENTATIONS[presentation["id"]] = presentation
        values.append(
            {
                "id": guid(r),
                **ctx.dates(),
                "enabled": r.random() < 0.8,
                "configurationType": "policy",
                "definition": dict(definition),
                "presentationValues": [
                    {
                        "@odata.type": G + "groupPolicyPresentationValueText",
                        "id": guid(r),
                        **ctx.dates(),
                        "value": f"value-{r.randrange(100)}",
                        "presentation": dict(presentation),
                    }
                ]
                if r.random() < 0.5
                else [],
            }
        )
    obj["definitionValues"] = values
    return obj


# The endpoint security templates intents are made from (Microsoft's, the same in every tenant).
# The old BitLocker template is deprecated: it no longer creates intents.
TEMPLATES: dict[str, dict[str, Any]] = {
    template_id: {
        "@odata.type": G + "deviceManagementTemplate",
        "id": template_id,
        "displayName": name,
        "isDeprecated": deprecated,
        "templateType": "securityTemplate",
        "templateSubtype": subtype,
    }
    for template_id, name, subtype, deprecated in (
        ("d1174162-1dd2-4976-affc-6667049ab0ae", "BitLocker", "diskEncryption", True),
        (
            "e44c2ca3-2f9a-400a-a113-6cc88efd773d",
            "Endpoint detection and response",
            "endpointDetectionReponse",
            False,
        ),
    )
}


def endpoint_security_intent(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = {
        "@odata.type": G + "deviceManagementIntent",
        "id": guid(r),
        "displayName": policy_name(ctx, "Endpoint security"),
        "description": "",
        "isAssigned": False,
        "lastModifiedDateTime": ctx.dates()["lastModifiedDateTime"],
        "templateId": r.choice(
            ("d1174162-1dd2-4976-affc-6667049ab0ae", "e44c2ca3-2f9a-400a-a113-6cc88efd773d")
        ),
        "roleScopeTagIds": ["0"],
    }
    obj["settings"] = [
        {
            "@odata.type": G + "deviceManagementBooleanSettingInstance",
            "id": guid(r),
            "definitionId": f"deviceConfiguration--windows10EndpointProtectionConfiguration_setting{n}",
            "valueJson": "true",
            "value": True,
        }
        for n in range(r.randrange(2, 8))
    ]
    return obj


def autopilot_profile(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    odata = r.choice(
        (
            "azureADWindowsAutopilotDeploymentProfile",
            "activeDirectoryWindowsAutopilotDeploymentProfile",
        )
    )
    obj = _base(ctx, odata, policy_name(ctx, "Autopilot"))
    obj.update(
        language="os-default",
        deviceNameTemplate=r.choice(("CORP-%SERIAL%", "", "LAB-%RAND:5%")),
        deviceType="windowsPc",
        enableWhiteGlove=r.random() < 0.5,
        outOfBoxExperienceSettings={
            "hidePrivacySettings": True,
            "hideEULA": True,
            "userType": "standard",
            "deviceUsageType": "singleUser",
            "skipKeyboardSelectionPage": True,
            "hideEscapeLink": True,
        },
    )
    return obj


def enrollment_builtins(ctx: Ctx) -> list[dict[str, Any]]:
    """The defaults Intune creates in every tenant: priority 0, ids ``<guid>_Default…``."""
    p = ctx.tenant_prefix
    rows = [
        ("deviceEnrollmentLimitConfiguration", "_DefaultLimit", "All users and all devices",
         {"limit": 15}),
        ("deviceEnrollmentPlatformRestrictionsConfiguration", "_DefaultPlatformRestrictions",
         "All users and all devices", {"iosRestriction": {"platformBlocked": False,
         "personalDeviceEnrollmentBlocked": False}, "androidRestriction": {
         "platformBlocked": False, "personalDeviceEnrollmentBlocked": True}}),
        ("deviceEnrollmentWindowsHelloForBusinessConfiguration",
         "_DefaultWindowsHelloForBusiness", "All users and all devices",
         {"state": "notConfigured", "pinMinimumLength": 6}),
        ("windows10EnrollmentCompletionPageConfiguration",
         "_DefaultWindows10EnrollmentCompletionPageConfiguration", "All users and all devices",
         {"showInstallationProgress": False, "blockDeviceSetupRetryByUser": False}),
    ]  # fmt: skip
    out = []
    for odata, suffix, name, extra in rows:
        obj = _base(ctx, odata, name, priority=0, version=1, **extra)
        obj["id"] = p + suffix
        obj["description"] = "This is the default enrollment configuration"
        obj["deviceEnrollmentConfigurationType"] = suffix.removeprefix("_Default").lower()
        obj["assignments"] = [
            make_assignment(
                "enrollment_configurations",
                obj["id"],
                {"@odata.type": G + "allLicensedUsersAssignmentTarget",
                 "deviceAndAppManagementAssignmentFilterId": None,
                 "deviceAndAppManagementAssignmentFilterType": "none"},
            )
        ]  # fmt: skip
        out.append(obj)
    return out


def enrollment_configuration(ctx: Ctx, priority: int) -> dict[str, Any]:
    r = ctx.rng
    kind = r.choice(("limit", "single", "single", "esp", "whfb", "notification"))
    if kind == "limit":
        obj = _base(ctx, "deviceEnrollmentLimitConfiguration", policy_name(ctx, "Device limit"))
        obj.update(limit=r.choice((5, 10, 15)), deviceEnrollmentConfigurationType="limit")
    elif kind == "single":
        platform = r.choice(("windows", "ios", "android", "mac", "androidForWork"))
        obj = _base(
            ctx,
            "deviceEnrollmentPlatformRestrictionConfiguration",
            policy_name(ctx, f"Restrict {platform}"),
        )
        obj.update(
            platformType=platform,
            deviceEnrollmentConfigurationType="singlePlatformRestriction",
            platformRestriction={
                "platformBlocked": r.random() < 0.3,
                "personalDeviceEnrollmentBlocked": r.random() < 0.5,
                "osMinimumVersion": None,
                "osMaximumVersion": None,
                "blockedManufacturers": [],
                "blockedSkus": [],
            },
        )
    elif kind == "esp":
        obj = _base(ctx, "windows10EnrollmentCompletionPageConfiguration", policy_name(ctx, "ESP"))
        obj.update(
            showInstallationProgress=True,
            installProgressTimeoutInMinutes=r.choice((60, 120)),
            deviceEnrollmentConfigurationType="windows10EnrollmentCompletionPageConfiguration",
        )
    elif kind == "whfb":
        obj = _base(
            ctx, "deviceEnrollmentWindowsHelloForBusinessConfiguration", policy_name(ctx, "WHfB")
        )
        obj.update(
            state="enabled",
            pinMinimumLength=6,
            deviceEnrollmentConfigurationType="windowsHelloForBusiness",
        )
    else:
        obj = _base(
            ctx, "deviceEnrollmentNotificationConfiguration", policy_name(ctx, "Notification")
        )
        obj.update(
            platformType=r.choice(("windows", "ios", "androidForWork")),
            templateType=r.choice(("email", "push")),
            notificationMessageTemplateId=guid(r),
            deviceEnrollmentConfigurationType="enrollmentNotificationsConfiguration",
        )
    obj.update(priority=priority, version=1)
    return obj


_APPS = {
    "ios": [("com.microsoft.office.outlook", "iosMobileAppIdentifier", "bundleId"),
            ("com.microsoft.skype.teams", "iosMobileAppIdentifier", "bundleId")],
    "android": [("com.microsoft.office.outlook", "androidMobileAppIdentifier", "packageId"),
                ("com.microsoft.teams", "androidMobileAppIdentifier", "packageId")],
    "windows": [("com.microsoft.edge", "windowsAppIdentifier", "windowsAppId")],
}  # fmt: skip


def _managed_apps(ctx: Ctx, platform: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{app}.{platform}",
            "mobileAppIdentifier": {"@odata.type": G + identifier, field: app},
            "version": "-1",
        }
        for app, identifier, field in _APPS[platform]
        if ctx.rng.random() < 0.8
    ]


def app_protection(ctx: Ctx, platform: str) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, f"{platform}ManagedAppProtection", policy_name(ctx, "App protection"))
    obj.update(
        version=f'"{r.randrange(1000, 9999)}"',
        periodOfflineBeforeAccessCheck="PT12H",
        pinRequired=r.random() < 0.8,
        dataBackupBlocked=True,
        isAssigned=False,
    )
    obj["apps"] = _managed_apps(ctx, platform)
    return obj


def mdm_wip(ctx: Ctx) -> dict[str, Any]:
    obj = _base(ctx, "mdmWindowsInformationProtectionPolicy", policy_name(ctx, "WIP"))
    obj.update(
        enforcementLevel=ctx.rng.choice(("silent", "encryptAndAuditOnly")),
        enterpriseDomain="contoso.com",
        version='"1"',
    )
    return obj


def managed_app_configuration(ctx: Ctx) -> dict[str, Any]:
    obj = _base(ctx, "targetedManagedAppConfiguration", policy_name(ctx, "MAM config"))
    obj.update(
        version='"1"',
        customSettings=[{"name": "com.microsoft.outlook.Mail.FocusedInbox", "value": "false"}],
    )
    obj["apps"] = _managed_apps(ctx, ctx.rng.choice(("ios", "android")))
    return obj


def mobile_app_configuration(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    odata = r.choice(("iosMobileAppConfiguration", "androidManagedStoreAppConfiguration"))
    obj = _base(ctx, odata, policy_name(ctx, "App config"), version=1)
    obj["targetedMobileApps"] = [guid(r)]
    if odata.startswith("ios"):
        obj["encodedSettingXml"] = base64.b64encode(b"<dict></dict>").decode()
    else:
        obj.update(
            packageId="app:com.microsoft.teams", payloadJson=None, profileApplicability="default"
        )
    return obj


def conditional_access_policy(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    dates = ctx.dates()
    include = [ctx.pick_group(r) for _ in range(r.randrange(0, 3))]
    return {
        "@odata.type": G + "conditionalAccessPolicy",
        "id": guid(r),
        "templateId": None,
        "displayName": policy_name(ctx, "CA"),
        "createdDateTime": dates["createdDateTime"],
        "modifiedDateTime": dates["lastModifiedDateTime"],
        "state": r.choice(("enabled", "disabled", "enabledForReportingButNotEnforced")),
        "conditions": {
            "userRiskLevels": [],
            "signInRiskLevels": [],
            "clientAppTypes": ["all"],
            "applications": {"includeApplications": ["All"], "excludeApplications": []},
            "users": {
                "includeUsers": [] if include else ["All"],
                "excludeUsers": [],
                "includeGroups": sorted(set(include)),
                "excludeGroups": [ctx.pick_group(r)] if r.random() < 0.4 else [],
                "includeRoles": [],
                "excludeRoles": [],
            },
            "platforms": None,
            "locations": None,
        },
        "grantControls": {
            "operator": "OR",
            "builtInControls": [r.choice(("mfa", "compliantDevice", "block"))],
            "customAuthenticationFactors": [],
            "termsOfUse": [],
        },
        "sessionControls": None,
    }


_FILTER_PLATFORMS = ("windows10AndLater", "iOS", "android", "macOS", "androidForWork")


def assignment_filter(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    platform = r.choice(_FILTER_PLATFORMS)
    obj = _base(ctx, "deviceAndAppManagementAssignmentFilter", policy_name(ctx, "Filter"))
    obj.update(
        platform=platform,
        rule=r.choice(
            ('(device.osVersion -startsWith "10.0.2")', '(device.deviceOwnership -eq "Corporate")')
        ),
        assignmentFilterManagementType="devices",
        roleScopeTags=["0"],
    )
    del obj["roleScopeTagIds"]
    return obj


def scope_tag(ctx: Ctx, number: int) -> dict[str, Any]:
    builtin = number == 0
    return {
        "@odata.type": G + "roleScopeTag",
        "id": str(number),
        "displayName": "Default" if builtin else f"{ctx.rng.choice(_WORDS)} {number}",
        "description": "" if not builtin else "Default scope tag",
        "isBuiltIn": builtin,
    }


BUILTIN_ROLES = ("Policy and Profile manager", "Read Only Operator", "Help Desk Operator")


def role_definition(ctx: Ctx, builtin_name: str | None) -> dict[str, Any]:
    r = ctx.rng
    obj = {
        "@odata.type": G + "deviceAndAppManagementRoleDefinition",
        "id": guid(r),
        "displayName": builtin_name or policy_name(ctx, "Role"),
        "description": "",
        "isBuiltIn": builtin_name is not None,
        "roleScopeTagIds": ["0"],
        "rolePermissions": [
            {
                "resourceActions": [
                    {
                        "allowedResourceActions": [
                            "Microsoft.Intune_DeviceConfigurations_Read",
                            "Microsoft.Intune_DeviceCompliancePolices_Read",
                        ][: r.randrange(1, 3)],
                        "notAllowedResourceActions": [],
                    }
                ]
            }
        ],
    }
    obj["roleAssignments"] = [
        {
            "@odata.type": G + "deviceAndAppManagementRoleAssignment",
            "id": guid(r),
            "displayName": f"Assignment {n}",
            "description": "",
            "members": [ctx.pick_group(r)],
            "resourceScopes": [ctx.pick_group(r)],
            "scopeType": "resourceScope",
        }
        for n in range(r.randrange(0, 3))
    ]
    return obj


def notification_template(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, "notificationMessageTemplate", policy_name(ctx, "Notice"))
    obj.update(
        defaultLocale="en-US", brandingOptions="includeCompanyLogo,includeContactInformation"
    )
    del obj["createdDateTime"]
    locales = ["en-US"] + [loc for loc in ("de-DE", "fr-FR") if r.random() < 0.4]
    obj["localizedNotificationMessages"] = [
        {
            "@odata.type": G + "localizedNotificationMessage",
            "id": f"{obj['id']}_{loc.lower()}",
            "lastModifiedDateTime": obj["lastModifiedDateTime"],
            "locale": loc,
            "subject": "Your device is not compliant",
            "messageTemplate": "Please update your device.",
            "isDefault": loc == "en-US",
        }
        for loc in locales
    ]
    return obj


def device_category(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    return {
        "@odata.type": G + "deviceCategory",
        "id": guid(r),
        "displayName": r.choice(_WORDS),
        "description": "",
        "roleScopeTagIds": ["0"],
    }


def policy_set(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, "policySet", policy_name(ctx, "Policy set"))
    obj.update(status="notAssigned", errorCode="noError", roleScopeTags=["0"])
    del obj["roleScopeTagIds"]
    items = []
    configs = ctx.policy_ids("device_configurations")
    for _ in range(r.randrange(1, 4)):
        if configs and r.random() < 0.5:
            items.append(
                {
                    "@odata.type": G + "deviceConfigurationPolicySetItem",
                    "id": guid(r),
                    "payloadId": r.choice(list(configs)),
                    "itemType": "#microsoft.graph.windows10GeneralConfiguration",
                    "displayName": "Device configuration",
                    "status": "notAssigned",
                    "errorCode": "noError",
                    "guidedDeploymentTags": [],
                }
            )
        else:
            items.append(
                {
                    "@odata.type": G + "mobileAppPolicySetItem",
                    "id": guid(r),
                    "payloadId": guid(r),
                    "itemType": "#microsoft.graph.win32LobApp",
                    "displayName": "Company Portal",
                    "status": "notAssigned",
                    "errorCode": "noError",
                    "guidedDeploymentTags": [],
                    "intent": r.choice(("required", "available", "uninstall")),
                    "settings": None,
                }
            )
    obj["items"] = items
    return obj


def _script_body(r: random.Random, shell: str) -> str:
    text = f"# generated {shell} script {r.randrange(10**6)}\nexit 0\n"
    return base64.b64encode(text.encode()).decode()


def powershell_script(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, "deviceManagementScript", policy_name(ctx, "Script"))
    obj.update(
        runAsAccount=r.choice(("system", "user")),
        enforceSignatureCheck=False,
        fileName=f"script{r.randrange(1000)}.ps1",
        runAs32Bit=False,
        scriptContent=_script_body(r, "powershell"),
    )
    return obj


def macos_shell_script(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, "deviceShellScript", policy_name(ctx, "Shell script"))
    obj.update(
        executionFrequency=r.choice(("PT0S", "PT1H", "P1D")),
        retryCount=r.randrange(0, 4),
        blockExecutionNotifications=True,
        runAsAccount="system",
        fileName=f"script{r.randrange(1000)}.sh",
        scriptContent=_script_body(r, "zsh"),
    )
    return obj


def device_health_script(ctx: Ctx, builtin: bool) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(
        ctx,
        "deviceHealthScript",
        "Restart stopped Office C2R svc" if builtin else policy_name(ctx, "Remediation"),
    )
    obj.update(
        publisher="Microsoft" if builtin else "IT",
        version="1.0",
        isGlobalScript=builtin,
        runAs32Bit=False,
        runAsAccount="system",
        enforceSignatureCheck=False,
        deviceHealthScriptType="deviceHealthScript",
        highestAvailableVersion=None,
        detectionScriptContent=_script_body(r, "detect"),
        remediationScriptContent=_script_body(r, "remediate"),
    )
    return obj


def compliance_script(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, "deviceComplianceScript", policy_name(ctx, "Compliance script"))
    obj.update(
        publisher="IT",
        version="1.0",
        runAs32Bit=False,
        runAsAccount="system",
        enforceSignatureCheck=False,
        detectionScriptContent=_script_body(r, "compliance"),
    )
    return obj


def feature_update_profile(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, "windowsFeatureUpdateProfile", policy_name(ctx, "Feature update"))
    version = r.choice(("Windows 11, version 23H2", "Windows 11, version 24H2"))
    obj.update(
        featureUpdateVersion=version,
        deployableContentDisplayName=version,
        endOfSupportDate="2026-11-10T00:00:00Z",
        installLatestWindows10OnWindows11IneligibleDevice=False,
        rolloutSettings={
            "offerStartDateTimeInUTC": None,
            "offerEndDateTimeInUTC": None,
            "offerIntervalInDays": None,
        },
    )
    return obj


def quality_update_profile(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, "windowsQualityUpdateProfile", policy_name(ctx, "Expedite"))
    obj.update(
        releaseDateDisplayName="May 14, 2024 - 2024.05 B Security Updates",
        deployableContentDisplayName="05/2024 Cumulative Update",
        expeditedUpdateSettings={
            "qualityUpdateRelease": "2024-05-14T00:00:00Z",
            "daysUntilForcedReboot": r.choice((0, 1, 2)),
        },
    )
    return obj


def driver_update_profile(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rng
    obj = _base(ctx, "windowsDriverUpdateProfile", policy_name(ctx, "Drivers"))
    obj.update(
        approvalType=r.choice(("manual", "automatic")),
        deploymentDeferralInDays=r.choice((0, 7)),
        newUpdates=r.randrange(0, 20),
        deviceReporting=r.randrange(0, 500),
        inventorySyncStatus={
            "lastSuccessfulSyncDateTime": None,
            "driverInventorySyncState": "success",
        },
    )
    return obj
