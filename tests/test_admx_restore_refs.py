"""An administrative template (ADMX) backup holds what its restore binds: Graph's
updateDefinitionValues adds each definition value by its definition's URL and each presentation
value by its presentation's, so a backup must hold both ids. The simulator serves presentations
expanded inside definition values and resolves those binds against Microsoft's global
catalogue, refusing an unknown one."""

from __future__ import annotations

import copy
import json

import pytest

from atlas_dagster.simulator import GraphSimulator, SimulatedTenant
from atlas_dagster.simulator.payloads import ADMX_DEFINITIONS, ADMX_PRESENTATIONS
from atlas_dagster.stores import backups as store
from graph_contracts import CONTRACTS, RESTORE_UNSUPPORTED, missing_backup_refs, restore_skip
from tests import test_backups
from tests.test_simulator import SECRET
from tests.test_simulator_writes import ALL_ROLES, DM, Writer, read_back, restorable

KEY = "group_policy_configurations"
ADMX = CONTRACTS[KEY]
CATALOGUE = "https://graph.microsoft.com/beta/deviceManagement/groupPolicyDefinitions"
PRESENTATION_PATH = "definitionValues[].presentationValues[].presentation.id"

make_env = test_backups.make_env


def presentation_values(definition_values: list[dict]) -> list[dict]:
    return [pv for v in definition_values for pv in v["presentationValues"]]


def added(value: dict, presentation_id: str | None = None) -> dict:
    """A backed-up definition value as updateDefinitionValues adds it: bound to its definition
    and presentations by URL, as IntuneManagement and Microsoft's examples write it."""
    definition = f"{CATALOGUE}('{value['definition']['id']}')"
    return {
        "enabled": value["enabled"],
        "definition@odata.bind": definition,
        "presentationValues": [
            {
                "@odata.type": pv["@odata.type"],
                "value": pv["value"],
                "presentation@odata.bind": (
                    f"{definition}/presentations('{presentation_id or pv['presentation']['id']}')"
                ),
            }
            for pv in value["presentationValues"]
        ],
    }


def test_a_backup_holds_every_presentation_id_and_is_restorable(make_env):
    env = make_env()
    _, backup = test_backups._backup(env)
    items = store.set_items(env.engine, backup.id, [KEY])
    payloads = store.load_payloads(env.engine, (i.content_hash for i in items.values()))
    backed_up = [json.loads(payloads[i.content_hash]) for i in items.values()]
    assert sorted(backed_up, key=lambda o: o["id"]) == sorted(
        env.tenant.policies(KEY), key=lambda o: o["id"]
    )
    values = [pv for obj in backed_up for pv in presentation_values(obj["definitionValues"])]
    assert values
    for pv in values:
        assert pv["presentation"] == ADMX_PRESENTATIONS[pv["presentation"]["id"]]
    for obj in backed_up:
        assert missing_backup_refs(ADMX, obj) == []
        assert restore_skip(ADMX, obj) is None


def test_a_backup_taken_without_presentations_cannot_be_restored():
    obj = next(
        o
        for o in SimulatedTenant.generate("small", 3).policies(KEY)
        if presentation_values(o["definitionValues"])
    )
    old = copy.deepcopy(obj)
    for pv in presentation_values(old["definitionValues"]):
        del pv["presentation"]
    assert missing_backup_refs(ADMX, old) == [PRESENTATION_PATH]
    reason, message = restore_skip(ADMX, old)
    assert reason == RESTORE_UNSUPPORTED and PRESENTATION_PATH in message


def test_presentations_come_back_only_when_expanded():
    sim = GraphSimulator(SimulatedTenant.generate("small", 7), client_secret=SECRET)
    graph = Writer(sim)
    obj = next(o for o in sim.tenant.policies(KEY) if presentation_values(o["definitionValues"]))
    url = f"{DM}/groupPolicyConfigurations/{obj['id']}/definitionValues?$expand="
    bare = graph.get(url + "presentationValues").json()["value"]
    assert all("presentation" not in pv for pv in presentation_values(bare))
    nested = graph.get(url + "presentationValues($expand=presentation)").json()["value"]
    assert presentation_values(nested) == presentation_values(obj["definitionValues"])


@pytest.fixture
def target() -> GraphSimulator:
    # Another tenant than the backup's: Microsoft's ADMX catalogue is the same in every tenant.
    return GraphSimulator(
        SimulatedTenant.generate("small", 11), client_secret=SECRET, granted_roles=ALL_ROLES
    )


def test_update_definition_values_binds_definitions_and_presentations(target):
    graph = Writer(target)
    backups = SimulatedTenant.generate("small", 3).policies(KEY)
    backup = next(o for o in backups if len(presentation_values(o["definitionValues"])) > 1)
    body = restorable(KEY, backup, "definitionValues")
    made = graph.send("POST", f"{DM}/groupPolicyConfigurations", body)
    assert made.status_code == 201, made.text
    policy_id = made.json()["id"]
    url = f"{DM}/groupPolicyConfigurations/{policy_id}/updateDefinitionValues"
    delta = {"added": [added(v) for v in backup["definitionValues"]]}
    assert graph.send("POST", url, delta).status_code == 204

    restored = read_back(target, KEY, policy_id)["definitionValues"]
    assert [(v["enabled"], v["definition"]["id"]) for v in restored] == [
        (v["enabled"], v["definition"]["id"]) for v in backup["definitionValues"]
    ]
    assert all(
        v["definition"]["displayName"] == ADMX_DEFINITIONS[v["definition"]["id"]]["displayName"]
        for v in restored
    )
    presented = presentation_values(restored)
    assert [(pv["value"], pv["presentation"]) for pv in presented] == [
        (pv["value"], pv["presentation"]) for pv in presentation_values(backup["definitionValues"])
    ]

    before = copy.deepcopy(target.tenant.stored_policy(KEY, policy_id))
    value = next(v for v in backup["definitionValues"] if v["presentationValues"])
    refused = graph.send("POST", url, {"added": [added(value, "no-such-presentation")]})
    assert refused.status_code == 400
    assert "no-such-presentation" in json.loads(refused.json()["error"]["message"])["Message"]
    assert target.tenant.stored_policy(KEY, policy_id) == before
