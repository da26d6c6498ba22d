"""Writes are contracts too: every policy collection says how Graph writes it, with which
permissions, and what it cannot write back and why (pure, no Graph)."""

from __future__ import annotations

import re

import pytest

from atlas_dagster.graph import path_pattern
from atlas_dagster.reasons import REASON_CODES, RESTORE_SECRET_UNAVAILABLE, RESTORE_UNSUPPORTED
from graph_contracts import (
    CONTRACTS,
    POLICY_CONTRACTS,
    THROTTLE_BUDGETS,
    WRITE_CONTRACTS,
    all_permissions,
    allowed_writes,
    masked_secrets,
    restore_skip,
    write_permissions,
)

A = "#microsoft.graph."
# The companions Graph wants besides Policy.ReadWrite.ConditionalAccess.
READ_COMPANIONS = {"Policy.Read.All", "Application.Read.All"}
# What each assign action's body calls its list (None: the collection has no assign action).
ASSIGN_KEYS = {
    "device_configurations": "assignments",
    "compliance_policies": "assignments",
    "settings_catalog": "assignments",
    "group_policy_configurations": "assignments",
    "endpoint_security_intents": "assignments",
    "autopilot_profiles": None,  # one POST per target: the element itself is the body
    "enrollment_configurations": "enrollmentConfigurationAssignments",
    "app_protection_ios": "assignments",
    "app_protection_android": "assignments",
    "app_protection_windows": "assignments",
    "app_protection_mdm_wip": "assignments",
    "managed_app_configurations": "assignments",
    "mobile_app_configurations": "assignments",
    "scope_tags": "assignments",
    "policy_sets": "assignments",
    "powershell_scripts": "deviceManagementScriptAssignments",
    "macos_shell_scripts": "deviceManagementScriptAssignments",
    "device_health_scripts": "deviceHealthScriptAssignments",
    "feature_update_profiles": "assignments",
    "quality_update_profiles": "assignments",
    "driver_update_profiles": "assignments",
}
UNASSIGNABLE = {
    "conditional_access_policies",  # its users and groups are conditions of the policy itself
    "assignment_filters",
    "role_definitions",  # assigned through role assignments, a nested write
    "notification_templates",
    "device_categories",
    "compliance_scripts",
}


def test_every_policy_collection_says_how_graph_writes_it():
    assert set(ASSIGN_KEYS) | UNASSIGNABLE == set(POLICY_CONTRACTS)
    for key in POLICY_CONTRACTS:
        writes = CONTRACTS[key].writes
        assert writes is not None, key
        assert writes.create is not None and writes.update is not None, key
        assert writes.create.effect == "create" and writes.update.effect == "patch", key
        assert (writes.assign is None) == (key in UNASSIGNABLE), key
        if CONTRACTS[key].builtin is not None:
            # What a built-in object cannot take is said, not silently dropped.
            assert writes.builtin_why, key
        else:
            assert not writes.builtin_writes, key


@pytest.mark.parametrize("key", sorted(ASSIGN_KEYS))
def test_each_assign_action_uses_its_own_body_key(key):
    assign = CONTRACTS[key].writes.assign
    assert assign.source == "assignments" and assign.body_key == ASSIGN_KEYS[key]
    if key == "autopilot_profiles":
        # The assign action of an Autopilot profile takes device ids; groups are added one by
        # one and removed one by one.
        assert (assign.method, assign.effect, assign.status) == ("POST", "append", 201)
        assert assign.path.endswith("/{id}/assignments")
        (unassign,) = CONTRACTS[key].writes.nested
        assert (unassign.method, unassign.effect) == ("DELETE", "remove_element")
    else:
        assert assign.method == "POST" and assign.effect == "set"  # replaces the whole set
        assert assign.path.endswith("/{id}/update" if key == "policy_sets" else "/{id}/assign")


def test_every_write_needs_a_readwrite_role_and_only_roles_writes_need():
    for key in WRITE_CONTRACTS:
        permissions = set(CONTRACTS[key].permissions)
        read_write = {p for p in permissions if ".ReadWrite." in p}
        assert read_write, key
        assert permissions - read_write <= READ_COMPANIONS, key
    assert set(write_permissions()) - set(all_permissions()) == {
        "DeviceManagementApps.ReadWrite.All",
        "DeviceManagementConfiguration.ReadWrite.All",
        "DeviceManagementManagedDevices.ReadWrite.All",
        "DeviceManagementRBAC.ReadWrite.All",
        "DeviceManagementServiceConfig.ReadWrite.All",
        "Policy.ReadWrite.ConditionalAccess",
        "Application.Read.All",
    }


def test_conditional_access_writes_need_more_than_one_permission():
    for name in ("create", "update"):
        contract = CONTRACTS[f"conditional_access_policies.{name}"]
        assert set(contract.permissions) == {
            "Policy.ReadWrite.ConditionalAccess",
            "Policy.Read.All",
            "Application.Read.All",
        }
        assert contract.api_version == "v1.0" and contract.throttle == "directory"
    create = CONTRACTS["conditional_access_policies.create"]
    assert (create.method, create.path) == ("POST", "/identity/conditionalAccess/policies")


def test_write_paths_are_well_formed_and_allowed_by_the_client():
    for key in WRITE_CONTRACTS:
        contract = CONTRACTS[key]
        write = contract.write
        assert contract.parent in POLICY_CONTRACTS and contract.parent + "." + write.name == key
        assert (contract.method, contract.path, contract.permissions) == (
            write.method,
            write.path,
            write.permissions,
        )
        assert contract.path.startswith(
            ("/deviceManagement/", "/deviceAppManagement/", "/identity/")
        )
        assert "//" not in contract.path and not contract.path.endswith("/")
        assert set(re.findall(r"\{[^}]*\}", contract.path)) <= {"{id}", "{sub_id}"}, key
        assert ("{id}" in contract.path) == (write.effect != "create" or write.id_from is not None)
        elementwise = write.effect in ("patch_element", "remove_element")
        assert ("{sub_id}" in contract.path) == elementwise, key
        if contract.throttle == "intune_write":
            assert contract.api_version == "beta"
        url = contract.write_path("00000000-0000-0000-0000-000000000001", "abc_en-us")
        assert "{" not in url and path_pattern(contract).match(url), key
        if "{id}" in contract.path:
            with pytest.raises(ValueError):
                contract.write_path("../x", "y")


def test_each_effect_names_what_it_writes():
    for key in WRITE_CONTRACTS:
        write = CONTRACTS[key].write
        if write.effect in ("set", "merge", "field", "replace"):
            assert write.source and write.body_key, key
        if write.effect == "delta":
            assert write.source and len(write.delta_keys) == 3, key
        if write.effect in ("append", "patch_element", "remove_element"):
            assert write.source, key
        assert 200 <= write.status < 300, key
        if write.effect == "create":
            assert write.status in (200, 201), key


def test_documented_specifics():
    # A settings catalog policy's settings are replaced by a PUT of the whole policy; its PATCH
    # changes the top-level fields only.
    writes = CONTRACTS["settings_catalog"].writes
    (replace,) = writes.nested
    assert (replace.method, replace.path, replace.effect, replace.source) == (
        "PUT",
        "/deviceManagement/configurationPolicies/{id}",
        "replace",
        "settings",
    )
    assert writes.update.method == "PATCH" and writes.create_inline == (("settings", "settings"),)
    # ADMX definition values: updateDefinitionValues with the definition and presentation
    # references a backup must hold.
    gp = CONTRACTS["group_policy_configurations"].writes
    (values,) = gp.nested
    assert values.path.endswith("/{id}/updateDefinitionValues")
    assert values.delta_keys == ("added", "updated", "deletedIds")
    assert gp.backup_needs == (
        "definitionValues[].definition.id",
        "definitionValues[].presentationValues[].presentation.id",
    )
    # Compliance: created with its scheduled actions, later replaced by scheduleActionsForRules.
    compliance = CONTRACTS["compliance_policies"].writes
    assert compliance.create_needs == ("scheduledActionsForRule",)
    (actions,) = compliance.nested
    assert (actions.path.rsplit("/", 1)[1], actions.body_key) == (
        "scheduleActionsForRules",
        "deviceComplianceScheduledActionForRules",
    )
    # Intents: created from their template, refused for a deprecated one; settings updated in
    # place by updateSettings.
    intents = CONTRACTS["endpoint_security_intents"].writes
    assert intents.create.path == "/deviceManagement/templates/{id}/createInstance"
    assert intents.create.id_from == "templateId"
    check = intents.create_requires
    assert (check.field, check.refused) == ("isDeprecated", True)
    assert CONTRACTS[check.contract].path == "/deviceManagement/templates/{id}"
    assert "isDeprecated" in CONTRACTS[check.contract].select
    assert intents.nested[0].name == "updateSettings" and intents.nested[0].effect == "merge"
    # Enrollment priority moves by setPriority, never by PATCH.
    enrollment = CONTRACTS["enrollment_configurations"].writes
    assert "priority" in enrollment.read_only
    assert [w.name for w in enrollment.nested] == ["setPriority"]
    # Writes have a throttling budget of their own: 100 per 20 s per app and tenant.
    assert THROTTLE_BUDGETS["intune_write"] == (100.0, 5.0)


def test_masked_secrets_skip_their_items_with_the_setting_named():
    config = CONTRACTS["device_configurations"]
    custom = {
        "@odata.type": A + "windows10CustomConfiguration",
        "omaSettings": [
            {"omaUri": "./Vendor/MSFT/A", "isEncrypted": True, "value": "****"},
            {"omaUri": "./Vendor/MSFT/B", "isEncrypted": False, "value": "1"},
        ],
    }
    assert masked_secrets(config, custom) == ["value of ./Vendor/MSFT/A"]
    reason, message = restore_skip(config, custom)
    assert reason == RESTORE_SECRET_UNAVAILABLE and "./Vendor/MSFT/A" in message
    custom["omaSettings"][0]["isEncrypted"] = False
    assert restore_skip(config, custom) is None

    wifi = {"@odata.type": A + "windowsWifiConfiguration", "ssid": "corp", "preSharedKey": None}
    assert restore_skip(config, wifi | {"wifiSecurityType": "wpa2Enterprise"}) is None
    assert masked_secrets(config, wifi | {"wifiSecurityType": "wpa2Personal"}) == [
        "preSharedKey of corp"
    ]

    secret = {
        "@odata.type": A + "deviceManagementConfigurationSecretSettingValue",
        "valueState": "encryptedValueToken",
        "value": "token",
    }
    catalog = {
        "settings": [
            {"settingInstance": {"settingDefinitionId": "plain", "simpleSettingValue": {"value": 1}}},
            {"settingInstance": {"settingDefinitionId": "outer", "groupSettingCollectionValue": [
                {"children": [{"settingDefinitionId": "inner_password", "simpleSettingValue": secret}]}
            ]}},
        ]
    }  # fmt: skip
    assert masked_secrets(CONTRACTS["settings_catalog"], catalog) == ["value of inner_password"]


def test_what_graph_cannot_write_back_is_skipped_with_its_reason():
    admx = CONTRACTS["group_policy_configurations"]
    old_backup = {
        "definitionValues": [{"definition": {"id": "d"}, "presentationValues": [{"value": "x"}]}]
    }
    reason, message = restore_skip(admx, old_backup)
    assert reason == RESTORE_UNSUPPORTED and "presentationValues[].presentation.id" in message
    old_backup["definitionValues"][0]["presentationValues"][0]["presentation"] = {"id": "p"}
    assert restore_skip(admx, old_backup) is None
    assert restore_skip(admx, {"definitionValues": [{"definition": {"id": "d"}}]}) is None

    scope_tags = CONTRACTS["scope_tags"]
    reason, message = restore_skip(scope_tags, {"id": "0", "isBuiltIn": True})
    assert reason == RESTORE_UNSUPPORTED and "Default scope tag" in message
    assert restore_skip(scope_tags, {"id": "3", "isBuiltIn": False}) is None

    # Built-in objects that Graph lets be changed in part: never created, only those writes.
    roles = CONTRACTS["role_definitions"]
    assert [w.name for w in allowed_writes(roles, {"isBuiltIn": True})] == [
        "addRoleAssignment",
        "updateRoleAssignment",
    ]
    remediation = CONTRACTS["device_health_scripts"]
    assert [w.name for w in allowed_writes(remediation, {"isGlobalScript": True})] == ["assign"]
    enrollment = CONTRACTS["enrollment_configurations"]
    default = {"id": "x_DefaultLimit", "priority": 0}
    assert [w.name for w in allowed_writes(enrollment, default)] == ["update"]
    assert "create" in [w.name for w in allowed_writes(enrollment, {"id": "y", "priority": 2})]
    with pytest.raises(ValueError):
        restore_skip(CONTRACTS["groups_delta"], {})


def test_restore_reason_codes_are_ledger_reason_codes():
    for code in (
        "restore_conflict",
        "restore_group_unmapped",
        "restore_reference_unmapped",
        "restore_unsupported",
        "restore_plan_expired",
        "restore_outcome_unknown",
        "restore_secret_unavailable",
    ):
        assert code in REASON_CODES
