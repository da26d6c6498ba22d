"""The Graph Contract Registry classifies what Graph returns: every policy contract against objects
shaped like the documented responses (Microsoft Graph beta reference, JSON representations),
including the enrollment-configuration collisions and the tenant's built-in defaults."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest

from graph_contracts import (
    CONTRACTS,
    POLICY_CONTRACTS,
    classify,
    content_hash,
    extract_assignments,
    missing_permissions,
    stable_payload,
)

TENANT = "a8d3c5e1-2f4b-4c6d-9e8f-0a1b2c3d4e5f"
GROUP = "98547f78-af1d-4134-b0bd-0bafc01064b5"
FILTER = "1c3e5a7b-9d2f-4e6a-8b0c-2d4f6a8c0e1b"
G = "#microsoft.graph."


def graph_object(odata_type: str | None, object_id: str, **fields: Any) -> dict[str, Any]:
    """The fields every Intune object carries, as a list response returns them."""
    obj: dict[str, Any] = {"@odata.type": G + odata_type} if odata_type else {}
    obj |= {
        "id": object_id,
        "displayName": fields.pop("displayName", f"{odata_type} {object_id[:8]}"),
        "description": "",
        "createdDateTime": "2024-01-22T16:18:00.0000000Z",
        "lastModifiedDateTime": "2024-02-07T20:03:00.0000000Z",
        "roleScopeTagIds": ["0"],
        "version": 3,
    }
    return obj | fields


def enrollment(odata_type: str, object_id: str, priority: int, **fields: Any) -> dict[str, Any]:
    return graph_object(odata_type, object_id, priority=priority, **fields)


@dataclass(frozen=True)
class Case:
    name: str
    obj: dict[str, Any]
    policy_type: str
    platform: str | None
    builtin: bool = False


def restriction(blocked: bool = False) -> dict[str, Any]:
    return {
        "@odata.type": "microsoft.graph.deviceEnrollmentPlatformRestriction",
        "platformBlocked": blocked,
        "personalDeviceEnrollmentBlocked": True,
        "osMinimumVersion": "10.0.19045",
        "osMaximumVersion": None,
        "blockedManufacturers": [],
        "blockedSkus": [],
    }


DEFAULT_LIMIT = enrollment(
    "deviceEnrollmentLimitConfiguration",
    f"{TENANT}_DefaultLimit",
    0,
    displayName="All users and all devices",
    limit=15,
    deviceEnrollmentConfigurationType="limit",
)
CUSTOM_LIMIT = enrollment(
    "deviceEnrollmentLimitConfiguration",
    "5e8a0f1c-3b2d-4a6e-9c7f-1d2e3f4a5b6c_Limit",
    1,
    displayName="Contractors - 3 devices",
    limit=3,
    deviceEnrollmentConfigurationType="limit",
)
DEFAULT_PLATFORM_RESTRICTIONS = enrollment(
    "deviceEnrollmentPlatformRestrictionsConfiguration",
    f"{TENANT}_DefaultPlatformRestrictions",
    0,
    displayName="All users and all devices",
    deviceEnrollmentConfigurationType="platformRestrictions",
    iosRestriction=restriction(),
    windowsRestriction=restriction(),
    windowsHomeSkuRestriction=restriction(),
    windowsMobileRestriction=restriction(blocked=True),
    androidRestriction=restriction(),
    androidForWorkRestriction=restriction(),
    macRestriction=restriction(),
    macOSRestriction=restriction(),
)
SINGLE_PLATFORM_RESTRICTION = enrollment(
    "deviceEnrollmentPlatformRestrictionConfiguration",
    "288ccb4d-4047-4797-85e2-77cc89058268_SinglePlatformRestriction",
    1,
    displayName="Windows - corporate only",
    deviceEnrollmentConfigurationType="singlePlatformRestriction",
    platformRestriction=restriction(),
    platformType="windows",
)

CASES: dict[str, list[Case]] = {
    "device_configurations": [
        Case(
            "custom OMA-URI",
            graph_object(
                "windows10CustomConfiguration",
                "0f6c1b3a-6d4e-4b8a-9f21-3c5d7e9a1b2c",
                omaSettings=[
                    {
                        "@odata.type": G + "omaSettingInteger",
                        "displayName": "Allow Telemetry",
                        "description": None,
                        "omaUri": "./Vendor/MSFT/Policy/Config/System/AllowTelemetry",
                        "secretReferenceValueId": None,
                        "isEncrypted": False,
                        "value": 1,
                        "isReadOnly": False,
                    }
                ],
            ),
            "device_configuration.custom_oma_uri",
            "windows",
        ),
        Case(
            "Windows update ring",
            graph_object(
                "windowsUpdateForBusinessConfiguration",
                "2b4d6f8a-0c1e-4a3b-8d5f-7e9a1b3c5d7f",
                deliveryOptimizationMode="httpWithPeeringNat",
                automaticUpdateMode="autoInstallAtMaintenanceTime",
                businessReadyUpdatesOnly="userDefined",
                qualityUpdatesDeferralPeriodInDays=7,
                featureUpdatesDeferralPeriodInDays=30,
                qualityUpdatesPaused=False,
                featureUpdatesPaused=False,
                deadlineForQualityUpdatesInDays=3,
            ),
            "update_ring",
            "windows",
        ),
        Case(
            "iOS update policy",
            graph_object(
                "iosUpdateConfiguration",
                "3c5e7a9b-1d2f-4b4c-9e6a-8f0b2c4d6e8a",
                activeHoursStart="09:00:00.0000000",
                activeHoursEnd="17:00:00.0000000",
                scheduledInstallDays=["monday", "wednesday"],
                utcTimeOffsetInMinutes=60,
                enforcedSoftwareUpdateDelayInDays=14,
                updateScheduleType="updateOutsideOfActiveHours",
                desiredOsVersion="17.5.1",
            ),
            "update_ring",
            "ios",
        ),
        Case(
            "Windows device restrictions",
            graph_object(
                "windows10GeneralConfiguration",
                "4d6f8a0b-2e3a-4c5d-8f7b-9a1c3d5e7f9b",
                passwordRequired=True,
                passwordMinimumLength=8,
            ),
            "device_configuration",
            "windows",
        ),
        Case(
            "macOS custom profile",
            graph_object(
                "macOSCustomConfiguration",
                "5e7a9b1c-3f4b-4d6e-9a8c-0b2d4e6f8a0c",
                payloadName="Wi-Fi",
                payloadFileName="wifi.mobileconfig",
                payload="PD94bWwgdmVyc2lvbj0iMS4wIj8+",
                deploymentChannel="deviceChannel",
            ),
            "device_configuration.custom_oma_uri",
            "macos",
        ),
        Case(
            "Android work profile restrictions",
            graph_object(
                "androidWorkProfileGeneralDeviceConfiguration",
                "6f8a0b2d-4a5c-4e7f-8b9d-1c3e5f7a9b1d",
                passwordMinimumLength=6,
            ),
            "device_configuration",
            "android",
        ),
        Case(
            "a type the registry does not list",
            graph_object("windowsKioskConfiguration", "7a9b1c3e-5b6d-4f8a-9c0e-2d4f6a8b0c2e"),
            "device_configuration",
            None,
        ),
    ],
    "compliance_policies": [
        Case(
            "Windows compliance with scheduled actions",
            graph_object(
                "windows10CompliancePolicy",
                "8b0c2d4f-6c7e-4a9b-8d1f-3e5a7b9c1d3f",
                passwordRequired=True,
                bitLockerEnabled=True,
                secureBootEnabled=True,
                osMinimumVersion="10.0.19045",
                scheduledActionsForRule=[
                    {
                        "id": "a1b2c3d4-0000-4000-8000-000000000001",
                        "ruleName": None,
                        "scheduledActionConfigurations": [
                            {
                                "id": "a1b2c3d4-0000-4000-8000-000000000002",
                                "gracePeriodHours": 0,
                                "actionType": "block",
                                "notificationTemplateId": "",
                                "notificationMessageCCList": [],
                            }
                        ],
                    }
                ],
            ),
            "compliance_policy",
            "windows",
        ),
        Case(
            "iOS compliance",
            graph_object(
                "iosCompliancePolicy",
                "9c1d3e5a-7d8f-4b0c-9e2a-4f6b8c0d2e4a",
                passcodeRequired=True,
                securityBlockJailbrokenDevices=True,
            ),
            "compliance_policy",
            "ios",
        ),
        Case(
            "Android Enterprise fully managed compliance",
            graph_object(
                "androidDeviceOwnerCompliancePolicy",
                "0d2e4f6b-8e9a-4c1d-8f3b-5a7c9d1e3f5b",
                storageRequireEncryption=True,
            ),
            "compliance_policy",
            "android",
        ),
        Case(
            "macOS compliance",
            graph_object(
                "macOSCompliancePolicy",
                "1e3f5a7c-9f0b-4d2e-9a4c-6b8d0e2f4a6c",
                firewallEnabled=True,
                systemIntegrityProtectionEnabled=True,
            ),
            "compliance_policy",
            "macos",
        ),
    ],
    "settings_catalog": [
        Case(
            "Windows settings catalog policy",
            {
                "id": "2f4a6b8d-0a1c-4e3f-8b5d-7c9e1f3a5b7d",
                "name": "Win - Edge baseline",
                "description": "",
                "platforms": "windows10",
                "technologies": "mdm",
                "createdDateTime": "2024-01-22T16:18:00Z",
                "lastModifiedDateTime": "2024-02-07T20:03:00Z",
                "settingCount": 12,
                "roleScopeTagIds": ["0"],
                "templateReference": {
                    "templateId": "",
                    "templateFamily": "none",
                    "templateDisplayName": None,
                    "templateDisplayVersion": None,
                },
            },
            "settings_catalog",
            "windows",
        ),
        Case(
            "macOS settings catalog policy",
            {
                "id": "3a5b7c9e-1b2d-4f4a-9c6e-8d0f2a4b6c8e",
                "name": "mac - FileVault",
                "platforms": "macOS",
                "technologies": "mdm,appleRemoteManagement",
                "settingCount": 4,
            },
            "settings_catalog",
            "macos",
        ),
        Case(
            "iOS settings catalog policy",
            {"id": "4b6c8d0f-2c3e-4a5b-8d7f-9e1a3b5c7d9f", "name": "iOS", "platforms": "iOS"},
            "settings_catalog",
            "ios",
        ),
        Case(
            "Linux settings catalog policy",
            {"id": "5c7d9e1a-3d4f-4b6c-9e8a-0f2b4c6d8e0a", "name": "Linux", "platforms": "linux"},
            "settings_catalog",
            "linux",
        ),
        Case(
            "Windows 10X settings catalog policy",
            {
                "id": "6d8e0f2b-4e5a-4c7d-8f9b-1a3c5d7e9f1b",
                "name": "10X",
                "platforms": "windows10X",
            },
            "settings_catalog",
            "windows",
        ),
    ],
    "group_policy_configurations": [
        Case(
            "administrative template",
            graph_object(
                "groupPolicyConfiguration",
                "7e9f1a3c-5f6b-4d8e-9a0c-2b4d6e8f0a2c",
                policyConfigurationIngestionType="builtIn",
            ),
            "administrative_template",
            "windows",
        ),
    ],
    "endpoint_security_intents": [
        Case(
            "security baseline intent",
            graph_object(
                "deviceManagementIntent",
                "8f0a2b4d-6a7c-4e9f-8b1d-3c5e7f9a1b3d",
                isAssigned=True,
                isMigratingToConfigurationPolicy=False,
                templateId="034ccd46-190c-4afc-adf1-ad7cc11262eb",
            ),
            "endpoint_security_intent",
            "windows",
        ),
    ],
    "autopilot_profiles": [
        Case(
            "Entra joined profile",
            graph_object(
                "azureADWindowsAutopilotDeploymentProfile",
                "9a1b3c5e-7b8d-4f0a-9c2e-4d6f8a0b2c4e",
                language="os-default",
                deviceNameTemplate="CORP-%SERIAL%",
                deviceType="windowsPc",
                enableWhiteGlove=True,
                outOfBoxExperienceSettings={
                    "hidePrivacySettings": True,
                    "hideEULA": True,
                    "userType": "standard",
                    "deviceUsageType": "singleUser",
                    "skipKeyboardSelectionPage": True,
                    "hideEscapeLink": True,
                },
            ),
            "autopilot_profile",
            "windows",
        ),
        Case(
            "hybrid joined profile",
            graph_object(
                "activeDirectoryWindowsAutopilotDeploymentProfile",
                "0b2c4d6f-8c9e-4a1b-8d3f-5e7a9b1c3d5f",
                hybridAzureADJoinSkipConnectivityCheck=True,
            ),
            "autopilot_profile",
            "windows",
        ),
    ],
    "enrollment_configurations": [
        Case("default device limit", DEFAULT_LIMIT, "enrollment.device_limit", None, True),
        Case("custom device limit", CUSTOM_LIMIT, "enrollment.device_limit", None, False),
        Case(
            "default platform restrictions (plural)",
            DEFAULT_PLATFORM_RESTRICTIONS,
            "enrollment.platform_restrictions",
            None,
            True,
        ),
        Case(
            "single-platform restriction (singular)",
            SINGLE_PLATFORM_RESTRICTION,
            "enrollment.single_platform_restriction",
            "windows",
            False,
        ),
        Case(
            "single-platform restriction for macOS",
            enrollment(
                "deviceEnrollmentPlatformRestrictionConfiguration",
                "3f5a7b9c-1e2a-4c4d-8e6f-7a9b1c3d5e7f_SinglePlatformRestriction",
                2,
                deviceEnrollmentConfigurationType="singlePlatformRestriction",
                platformRestriction=restriction(blocked=True),
                platformType="mac",
            ),
            "enrollment.single_platform_restriction",
            "macos",
            False,
        ),
        Case(
            "default Windows Hello for Business",
            enrollment(
                "deviceEnrollmentWindowsHelloForBusinessConfiguration",
                f"{TENANT}_DefaultWindowsHelloForBusiness",
                0,
                displayName="All users and all devices",
                deviceEnrollmentConfigurationType="windowsHelloForBusiness",
                state="notConfigured",
                pinMinimumLength=6,
                pinMaximumLength=127,
                securityDeviceRequired=False,
                enhancedBiometricsState="notConfigured",
            ),
            "enrollment.windows_hello_for_business",
            "windows",
            True,
        ),
        Case(
            "custom Windows Hello for Business",
            enrollment(
                "deviceEnrollmentWindowsHelloForBusinessConfiguration",
                "4a6b8c0d-2f3b-4d5e-9f7a-8b0c2d4e6f8a_WindowsHelloForBusiness",
                1,
                deviceEnrollmentConfigurationType="windowsHelloForBusiness",
                state="enabled",
                pinMinimumLength=8,
            ),
            "enrollment.windows_hello_for_business",
            "windows",
            False,
        ),
        Case(
            "default enrollment status page",
            enrollment(
                "windows10EnrollmentCompletionPageConfiguration",
                f"{TENANT}_DefaultWindows10EnrollmentCompletionPageConfiguration",
                0,
                displayName="All users and all devices",
                deviceEnrollmentConfigurationType="windows10EnrollmentCompletionPageConfiguration",
                showInstallationProgress=False,
                blockDeviceSetupRetryByUser=False,
                allowDeviceResetOnInstallFailure=False,
                installProgressTimeoutInMinutes=60,
                selectedMobileAppIds=[],
            ),
            "enrollment.status_page",
            "windows",
            True,
        ),
        Case(
            "custom enrollment status page",
            enrollment(
                "windows10EnrollmentCompletionPageConfiguration",
                "5b7c9d1e-3a4c-4e6f-8a8b-9c1d3e5f7a9b_Windows10EnrollmentCompletionPageConfiguration",
                1,
                deviceEnrollmentConfigurationType="windows10EnrollmentCompletionPageConfiguration",
                showInstallationProgress=True,
                selectedMobileAppIds=["0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"],
            ),
            "enrollment.status_page",
            "windows",
            False,
        ),
        Case(
            "co-management authority",
            enrollment(
                "deviceComanagementAuthorityConfiguration",
                "6c8d0e2f-4b5d-4f7a-9b9c-0d2e4f6a8b0c_DeviceComanagementAuthorityConfiguration",
                2,
                deviceEnrollmentConfigurationType="deviceComanagementAuthorityConfiguration",
                managedDeviceAuthority=1,
                installConfigurationManagerAgent=True,
                configurationManagerAgentCommandLineArgument="CCMSETUPCMD=/mp:https://cmg",
            ),
            "enrollment.comanagement_authority",
            "windows",
            False,
        ),
        Case(
            "Windows restore",
            enrollment(
                "windowsRestoreDeviceEnrollmentConfiguration",
                "7d9e1f3a-5c6e-4a8b-8c0d-1e3f5a7b9c1d_WindowsRestore",
                3,
                deviceEnrollmentConfigurationType="windowsRestore",
                state="enabled",
            ),
            "enrollment.windows_restore",
            "windows",
            False,
        ),
        Case(
            "enrollment notification",
            enrollment(
                "deviceEnrollmentNotificationConfiguration",
                "bdd0743a-743a-bdd0-3a74-d0bd3a74d0bd",
                8,
                deviceEnrollmentConfigurationType="enrollmentNotificationsConfiguration",
                platformType="ios",
                templateType="push",
                notificationMessageTemplateId="eba3ed57-ed57-eba3-57ed-a3eb57eda3eb",
                notificationTemplates=["Push_eba3ed57-ed57-eba3-57ed-a3eb57eda3eb"],
                brandingOptions="includeCompanyLogo",
                defaultLocale="en-US",
            ),
            "enrollment.notification",
            "ios",
            False,
        ),
        Case(
            "a type the registry does not know yet",
            enrollment(
                "deviceEnrollmentSomethingNewConfiguration",
                "8e0f2a4b-6d7f-4b9c-9d1e-2f4a6b8c0d2e",
                4,
                deviceEnrollmentConfigurationType="unknownFutureValue",
            ),
            "enrollment",
            None,
            False,
        ),
    ],
    "app_protection_ios": [
        Case(
            "iOS app protection",
            graph_object(
                "iosManagedAppProtection",
                "T_1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
                pinRequired=True,
                minimumPinLength=6,
                appDataEncryptionType="whenDeviceLocked",
                apps=[
                    {
                        "id": "com.microsoft.office.outlook.ios",
                        "mobileAppIdentifier": {
                            "@odata.type": G + "iosMobileAppIdentifier",
                            "bundleId": "com.microsoft.office.outlook",
                        },
                    }
                ],
            ),
            "app_protection",
            "ios",
        ),
    ],
    "app_protection_android": [
        Case(
            "Android app protection",
            graph_object(
                "androidManagedAppProtection",
                "T_2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e",
                pinRequired=True,
                screenCaptureBlocked=True,
            ),
            "app_protection",
            "android",
        ),
    ],
    "app_protection_windows": [
        Case(
            "Windows app protection",
            graph_object(
                "windowsManagedAppProtection",
                "T_3c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f",
                printBlocked=True,
                allowedInboundDataTransferSources="allSources",
            ),
            "app_protection",
            "windows",
        ),
    ],
    "app_protection_mdm_wip": [
        Case(
            "MDM Windows Information Protection",
            graph_object(
                "mdmWindowsInformationProtectionPolicy",
                "4d5e6f7a-8b9c-4d0e-9f1a-3b4c5d6e7f8a",
                enforcementLevel="encryptAuditAndBlock",
                enterpriseDomain="contoso.com",
            ),
            "app_protection.mdm_wip",
            "windows",
        ),
    ],
    "managed_app_configurations": [
        Case(
            "targeted managed app configuration",
            graph_object(
                "targetedManagedAppConfiguration",
                "A_5e6f7a8b-9c0d-4e1f-8a2b-4c5d6e7f8a9b",
                customSettings=[{"name": "IntuneMAMUPN", "value": "{{userprincipalname}}"}],
                appGroupType="selectedPublicApps",
                targetedAppManagementLevels="unspecified",
            ),
            "app_configuration.managed_apps",
            None,
        ),
    ],
    "mobile_app_configurations": [
        Case(
            "iOS managed device app configuration",
            graph_object(
                "iosMobileAppConfiguration",
                "6f7a8b9c-0d1e-4f2a-9b3c-5d6e7f8a9b0c",
                targetedMobileApps=["0a1b2c3d-4e5f-4061-8273-948596a7b8c9"],
                encodedSettingXml=None,
                settings=[
                    {
                        "appConfigKey": "IntuneMAMAllowedAccountsOnly",
                        "appConfigKeyType": "stringType",
                        "appConfigKeyValue": "Enabled",
                    }
                ],
            ),
            "app_configuration.managed_devices",
            "ios",
        ),
        Case(
            "Android Enterprise app configuration",
            graph_object(
                "androidManagedStoreAppConfiguration",
                "7a8b9c0d-1e2f-4a3b-8c4d-6e7f8a9b0c1d",
                packageId="app:com.microsoft.office.outlook",
                payloadJson="eyJraW5kIjoiYW5kcm9pZGVudGVycHJpc2UjbWFuYWdlZENvbmZpZ3VyYXRpb24ifQ==",
                profileApplicability="androidWorkProfile",
                connectedAppsEnabled=False,
            ),
            "app_configuration.managed_devices",
            "android",
        ),
    ],
    "conditional_access_policies": [
        Case(
            "conditional access policy (v1.0)",
            {
                "id": "4be5b6a8-2e3c-4f0e-9c1f-0b9a8d7c6e5f",
                "displayName": "Require MFA for admins",
                "createdDateTime": "2024-01-22T16:18:00Z",
                "modifiedDateTime": "2024-02-07T20:03:00Z",
                "state": "enabledForReportingButNotEnforced",
                "conditions": {
                    "clientAppTypes": ["all"],
                    "applications": {"includeApplications": ["All"]},
                    "users": {"includeRoles": ["62e90394-69f5-4237-9190-012177145e10"]},
                },
                "grantControls": {"operator": "OR", "builtInControls": ["mfa"]},
                "sessionControls": None,
            },
            "conditional_access",
            None,
        ),
    ],
    "assignment_filters": [
        Case(
            "Windows device filter",
            graph_object(
                "deviceAndAppManagementAssignmentFilter",
                FILTER,
                platform="windows10AndLater",
                rule='(device.osVersion -startsWith "10.0.22")',
                assignmentFilterManagementType="devices",
            ),
            "assignment_filter",
            "windows",
        ),
        Case(
            "iOS device filter",
            graph_object(
                "deviceAndAppManagementAssignmentFilter",
                "8b9c0d1e-2f3a-4b4c-9d5e-7f8a9b0c1d2e",
                platform="iOS",
                rule='(device.model -contains "iPad")',
                assignmentFilterManagementType="devices",
            ),
            "assignment_filter",
            "ios",
        ),
        Case(
            "iOS app filter (MAM)",
            graph_object(
                "deviceAndAppManagementAssignmentFilter",
                "9c0d1e2f-3a4b-4c5d-8e6f-8a9b0c1d2e3f",
                platform="iOSMobileApplicationManagement",
                rule='(app.deviceManagementType -eq "Unmanaged")',
                assignmentFilterManagementType="apps",
            ),
            "assignment_filter",
            "ios",
        ),
    ],
    "scope_tags": [
        Case(
            "built-in Default scope tag",
            graph_object("roleScopeTag", "0", displayName="Default", isBuiltIn=True),
            "scope_tag",
            None,
            True,
        ),
        Case(
            "custom scope tag",
            graph_object("roleScopeTag", "1", displayName="Berlin", isBuiltIn=False),
            "scope_tag",
            None,
            False,
        ),
    ],
    "role_definitions": [
        Case(
            "built-in Intune role",
            graph_object(
                "deviceAndAppManagementRoleDefinition",
                "9e0fa4c2-3d2f-4a3c-8b1e-2d5f7a9c1e3b",
                displayName="Help Desk Operator",
                isBuiltIn=True,
                isBuiltInRoleDefinition=True,
                rolePermissions=[
                    {"resourceActions": [{"allowedResourceActions": ["Microsoft.Intune_*"]}]}
                ],
            ),
            "role_definition",
            None,
            True,
        ),
        Case(
            "custom Intune role",
            graph_object(
                "deviceAndAppManagementRoleDefinition",
                "0f1a5b3d-4e3a-4b4d-9c2f-3e6a8b0d2f4c",
                displayName="Berlin helpdesk",
                isBuiltIn=False,
                isBuiltInRoleDefinition=False,
                rolePermissions=[],
            ),
            "role_definition",
            None,
            False,
        ),
    ],
    "notification_templates": [
        Case(
            "compliance notification template",
            graph_object(
                "notificationMessageTemplate",
                "1a2b6c4e-5f4b-4c5e-8d3a-4f7b9c1e3a5d",
                defaultLocale="en-US",
                brandingOptions="includeCompanyLogo,includeContactInformation",
            ),
            "notification_template",
            None,
        ),
    ],
    "device_categories": [
        Case(
            "device category",
            {
                "@odata.type": G + "deviceCategory",
                "id": "2b3c7d5f-6a5c-4d6f-9e4b-5a8c0d2f4b6e",
                "displayName": "Kiosk",
                "description": "Shared kiosk devices",
                "roleScopeTagIds": ["0"],
            },
            "device_category",
            None,
        ),
    ],
    "policy_sets": [
        Case(
            "policy set",
            graph_object(
                "policySet",
                "3c4d8e6a-7b6d-4e7a-8f5c-6b9d1e3a5c7f",
                status="success",
                errorCode="noError",
                guidedDeploymentTags=[],
            ),
            "policy_set",
            None,
        ),
    ],
    "powershell_scripts": [
        Case(
            "PowerShell script",
            graph_object(
                "deviceManagementScript",
                "4d5e9f7b-8c7e-4f8b-9a6d-7c0e2f4b6d8a",
                runAsAccount="system",
                enforceSignatureCheck=False,
                fileName="Set-TimeZone.ps1",
                runAs32Bit=False,
            ),
            "script.powershell",
            "windows",
        ),
    ],
    "macos_shell_scripts": [
        Case(
            "macOS shell script",
            graph_object(
                "deviceShellScript",
                "5e6f0a8c-9d8f-4a9c-8b7e-8d1f3a5c7e9b",
                executionFrequency="PT1H",
                retryCount=3,
                blockExecutionNotifications=True,
                runAsAccount="user",
                fileName="dock.sh",
            ),
            "script.macos_shell",
            "macos",
        ),
    ],
    "device_health_scripts": [
        Case(
            "Microsoft's global remediation",
            graph_object(
                "deviceHealthScript",
                "6f7a1b9d-0e9a-4b0d-9c8f-9e2a4b6d8f0c",
                displayName="Restart stopped Office C2R svc",
                publisher="Microsoft",
                isGlobalScript=True,
                deviceHealthScriptType="deviceHealthScript",
                runAsAccount="system",
                runAs32Bit=False,
                enforceSignatureCheck=False,
            ),
            "script.remediation",
            "windows",
            True,
        ),
        Case(
            "tenant remediation",
            graph_object(
                "deviceHealthScript",
                "7a8b2c0e-1f0b-4c1e-8d9a-0f3b5c7e9a1d",
                publisher="Contoso IT",
                isGlobalScript=False,
                deviceHealthScriptType="deviceHealthScript",
                runAsAccount="system",
            ),
            "script.remediation",
            "windows",
            False,
        ),
    ],
    "compliance_scripts": [
        Case(
            "custom compliance discovery script",
            graph_object(
                "deviceComplianceScript",
                "8b9c3d1f-2a1c-4d2f-9e0b-1a4c6d8f0b2e",
                publisher="Contoso IT",
                runAsAccount="system",
                runAs32Bit=False,
                enforceSignatureCheck=False,
            ),
            "script.compliance",
            "windows",
        ),
    ],
    "feature_update_profiles": [
        Case(
            "feature update profile",
            graph_object(
                "windowsFeatureUpdateProfile",
                "9c0d4e2a-3b2d-4e3a-8f1c-2b5d7e9a1c3f",
                featureUpdateVersion="Windows 11, version 23H2",
                installLatestWindows10OnWindows11IneligibleDevice=True,
                rolloutSettings={"offerStartDateTimeInUTC": None},
            ),
            "update_profile.feature",
            "windows",
        ),
    ],
    "quality_update_profiles": [
        Case(
            "expedited quality update profile",
            graph_object(
                "windowsQualityUpdateProfile",
                "0d1e5f3b-4c3e-4f4b-9a2d-3c6e8f0b2d4a",
                expeditedUpdateSettings={
                    "qualityUpdateRelease": "2024-06-11T00:00:00Z",
                    "daysUntilForcedReboot": 1,
                },
                releaseDateDisplayName="June 11, 2024 - 2024.06 B Security Updates",
            ),
            "update_profile.quality",
            "windows",
        ),
    ],
    "driver_update_profiles": [
        Case(
            "driver update profile",
            graph_object(
                "windowsDriverUpdateProfile",
                "1e2f6a4c-5d4f-4a5c-8b3e-4d7f9a1c3e5b",
                approvalType="manual",
                deviceReporting=12,
                newUpdates=2,
            ),
            "update_profile.driver",
            "windows",
        ),
    ],
}


@pytest.mark.parametrize("key", POLICY_CONTRACTS)
def test_every_policy_contract_classifies_documented_objects(key: str):
    cases = CASES.get(key)
    assert cases, f"policy contract {key} has no classification case in this file"
    contract = CONTRACTS[key]
    for case in cases:
        got = classify(contract, case.obj)
        assert (got.policy_type, got.platform, got.builtin) == (
            case.policy_type,
            case.platform,
            case.builtin,
        ), f"{key}: {case.name}"


def test_cases_name_only_registered_policy_contracts():
    assert set(CASES) <= set(POLICY_CONTRACTS)


def test_singular_and_plural_platform_restrictions_are_different_policy_types():
    contract = CONTRACTS["enrollment_configurations"]
    plural = classify(contract, DEFAULT_PLATFORM_RESTRICTIONS)
    singular = classify(contract, SINGLE_PLATFORM_RESTRICTION)
    assert plural.policy_type == "enrollment.platform_restrictions"
    assert singular.policy_type == "enrollment.single_platform_restriction"
    assert (singular.platform, plural.platform) == ("windows", None)


def test_the_default_limit_is_builtin_and_a_custom_limit_is_not():
    contract = CONTRACTS["enrollment_configurations"]
    assert classify(contract, DEFAULT_LIMIT).builtin
    assert not classify(contract, CUSTOM_LIMIT).builtin


def test_a_default_is_recognised_by_its_id_suffix_even_without_priority():
    contract = CONTRACTS["enrollment_configurations"]
    listed = {k: v for k, v in DEFAULT_LIMIT.items() if k != "priority"}
    assert classify(contract, listed).builtin


def test_an_unknown_odata_type_in_a_known_collection_falls_back_to_the_default_type():
    for key in POLICY_CONTRACTS:
        contract = CONTRACTS[key]
        got = classify(contract, {"@odata.type": G + "brandNewPolicyKind", "id": "x"})
        assert got.policy_type == contract.default_policy_type, key
        assert got.platform == contract.default_platform, key
        assert got.builtin is False, key


def test_an_object_without_odata_type_takes_the_contract_defaults():
    contract = CONTRACTS["device_configurations"]
    got = classify(contract, {"id": "0f6c1b3a-6d4e-4b8a-9f21-3c5d7e9a1b2c"})
    assert (got.policy_type, got.platform, got.builtin) == ("device_configuration", None, False)


# --- Assignments -----------------------------------------------------------------------------


def target(kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "@odata.type": G + kind,
        "deviceAndAppManagementAssignmentFilterId": None,
        "deviceAndAppManagementAssignmentFilterType": "none",
    } | fields


def test_assignment_targets_flatten_to_group_filter_and_intent_rows():
    policy = {
        "id": "0f6c1b3a-6d4e-4b8a-9f21-3c5d7e9a1b2c",
        "assignments": [
            {"id": "a1", "target": target("groupAssignmentTarget", groupId=GROUP)},
            {
                "id": "a2",
                "target": target(
                    "exclusionGroupAssignmentTarget",
                    groupId="c705af91-ab14-4655-b198-0bafc01064d1",
                    deviceAndAppManagementAssignmentFilterId=FILTER,
                    deviceAndAppManagementAssignmentFilterType="include",
                ),
            },
            {
                "id": "a3",
                "target": target(
                    "allDevicesAssignmentTarget",
                    deviceAndAppManagementAssignmentFilterId=FILTER,
                    deviceAndAppManagementAssignmentFilterType="exclude",
                ),
            },
            {"id": "a4", "target": target("allLicensedUsersAssignmentTarget")},
        ],
    }
    assert extract_assignments(policy) == [
        {
            "target_type": "group",
            "group_id": GROUP,
            "filter_id": None,
            "filter_type": None,
            "intent": "include",
        },
        {
            "target_type": "exclusionGroup",
            "group_id": "c705af91-ab14-4655-b198-0bafc01064d1",
            "filter_id": FILTER,
            "filter_type": "include",
            "intent": "exclude",
        },
        {
            "target_type": "allDevices",
            "group_id": None,
            "filter_id": FILTER,
            "filter_type": "exclude",
            "intent": "include",
        },
        {
            "target_type": "allLicensedUsers",
            "group_id": None,
            "filter_id": None,
            "filter_type": None,
            "intent": "include",
        },
    ]


def test_an_app_assignment_keeps_its_intent():
    app = {
        "id": "0a1b2c3d-4e5f-4061-8273-948596a7b8c9",
        "assignments": [
            {
                "@odata.type": G + "mobileAppAssignment",
                "id": "0a1b2c3d-4e5f-4061-8273-948596a7b8c9_1_0",
                "intent": "required",
                "target": target("groupAssignmentTarget", groupId=GROUP),
                "settings": None,
            }
        ],
    }
    [row] = extract_assignments(app)
    assert (row["target_type"], row["group_id"], row["intent"]) == ("group", GROUP, "required")


def test_an_object_without_assignments_has_no_rows():
    assert extract_assignments({"id": "x"}) == []
    assert extract_assignments({"id": "x", "assignments": None}) == []


# --- Permissions -------------------------------------------------------------------------------


def test_readwrite_grants_read_but_read_does_not_grant_readwrite():
    config_read = "DeviceManagementConfiguration.Read.All"
    config_write = "DeviceManagementConfiguration.ReadWrite.All"
    assert missing_permissions([config_read], [config_write]) == []
    assert missing_permissions([config_read], [config_read]) == []
    assert missing_permissions([config_write], [config_read]) == [config_write]


def test_missing_permissions_lists_every_missing_one_in_order():
    required = [
        "DeviceManagementConfiguration.Read.All",
        "DeviceManagementApps.Read.All",
        "DeviceManagementRBAC.Read.All",
    ]
    roles = ["DeviceManagementApps.ReadWrite.All", "Group.Read.All"]
    assert missing_permissions(required, roles) == [
        "DeviceManagementConfiguration.Read.All",
        "DeviceManagementRBAC.Read.All",
    ]


# --- Content hashes ----------------------------------------------------------------------------


def hashed_policy() -> dict[str, Any]:
    policy = copy.deepcopy(CASES["device_configurations"][0].obj)
    policy["@odata.context"] = "https://graph.microsoft.com/beta/$metadata#deviceConfigurations"
    policy["roleScopeTagIds"] = ["0", "3"]
    policy["assignments"] = [
        {"id": "a1", "target": target("groupAssignmentTarget", groupId=GROUP)},
        {"id": "a2", "target": target("allDevicesAssignmentTarget")},
    ]
    policy["assignments@odata.context"] = "https://graph.microsoft.com/beta/$metadata#assignments"
    return policy


def test_volatile_fields_and_unordered_arrays_do_not_change_the_hash():
    contract = CONTRACTS["device_configurations"]
    before = hashed_policy()
    after = hashed_policy()
    after["lastModifiedDateTime"] = "2025-01-01T00:00:00.0000000Z"
    after["version"] = 9
    after["@odata.context"] = "https://graph.microsoft.com/beta/$metadata#other"
    after["@odata.etag"] = 'W/"2"'
    after["assignments"].reverse()
    after["roleScopeTagIds"].reverse()
    del after["assignments@odata.context"]
    assert content_hash(contract, after) == content_hash(contract, before)


def test_a_real_setting_change_changes_the_hash():
    contract = CONTRACTS["device_configurations"]
    changed = hashed_policy()
    changed["omaSettings"][0]["value"] = 3
    assert content_hash(contract, changed) != content_hash(contract, hashed_policy())


def test_a_new_assignment_changes_the_hash():
    contract = CONTRACTS["device_configurations"]
    changed = hashed_policy()
    changed["assignments"].append(
        {"id": "a3", "target": target("allLicensedUsersAssignmentTarget")}
    )
    assert content_hash(contract, changed) != content_hash(contract, hashed_policy())


def test_stable_payload_keeps_the_odata_type_and_nested_fields_named_like_volatile_ones():
    contract = CONTRACTS["device_configurations"]
    policy = hashed_policy()
    policy["omaSettings"][0]["version"] = "1.0"
    stable = stable_payload(contract, policy)
    assert stable["@odata.type"] == G + "windows10CustomConfiguration"
    assert "version" not in stable and "lastModifiedDateTime" not in stable
    assert "@odata.context" not in stable and "assignments@odata.context" not in stable
    assert stable["omaSettings"][0]["version"] == "1.0"
    assert stable["omaSettings"][0]["@odata.type"] == G + "omaSettingInteger"


# --- Request URLs ------------------------------------------------------------------------------


def test_a_collection_url_carries_select_expand_and_top():
    url = CONTRACTS["settings_catalog"].relative_url()
    path, query = url.split("?")
    assert path == "/deviceManagement/configurationPolicies"
    params = dict(p.split("=", 1) for p in query.split("&"))
    assert params["$select"].split(",")[:3] == ["id", "name", "description"]
    assert params["$expand"] == "assignments"
    assert params["$top"] == "100"
    assert CONTRACTS["settings_catalog"].relative_url(top=7).endswith("&$top=7")


def test_an_item_url_puts_the_id_in_the_path():
    contract = CONTRACTS["settings_catalog.settings"]
    policy_id = "2f4a6b8d-0a1c-4e3f-8b5d-7c9e1f3a5b7d"
    assert contract.relative_url(policy_id) == (
        f"/deviceManagement/configurationPolicies/{policy_id}/settings"
        "?$expand=settingDefinitions&$top=25"
    )
    assert CONTRACTS["policy_sets.item"].relative_url("3c4d8e6a") == (
        "/deviceAppManagement/policySets/3c4d8e6a?$expand=assignments,items"
    )
    assert (
        CONTRACTS["enrollment_configurations"]
        .relative_url()
        .endswith("deviceEnrollmentConfigurations?$expand=assignments&$top=100")
    )


def test_a_delta_url_asks_for_no_top():
    assert "$top" not in CONTRACTS["groups_delta"].relative_url()


@pytest.mark.parametrize(
    "bad_id", ["a/b", "a?b", "../deviceConfigurations", "..", ".", "x&$expand=y", "a b", "", None]
)
def test_an_item_url_refuses_ids_that_could_alter_the_request(bad_id):
    with pytest.raises(ValueError):
        CONTRACTS["powershell_scripts.item"].relative_url(bad_id)
