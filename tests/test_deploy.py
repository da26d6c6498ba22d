"""deploy/ past one machine: neither the image nor the Helm release can be built here (no Docker
engine, no registry, no cluster), so these hold them to what is tested here: the Helm values carry
deploy/dagster.yaml's instance settings, and the image installs the package the way .ci/run does
and serves the code location."""

import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def local_instance_settings(conf: dict) -> dict:
    """The settings compared, from a dagster.yaml. Run limits may sit under ``concurrency.runs``
    or under the queued coordinator's ``config``: Dagster reads either."""
    coordinator = conf["run_coordinator"]
    runs = conf.get("concurrency", {}).get("runs") or coordinator.get("config", {})
    return {
        "run_coordinator": coordinator["class"],
        "dequeue_interval_seconds": coordinator.get("config", {}).get("dequeue_interval_seconds"),
        "max_concurrent_runs": runs.get("max_concurrent_runs"),
        "tag_concurrency_limits": runs.get("tag_concurrency_limits"),
        "run_monitoring": conf["run_monitoring"],
        "telemetry": conf["telemetry"],
        "nux": conf["nux"],
        "storage": list(conf["storage"]),
    }


def helm_instance_settings(values: dict) -> dict:
    """The same settings as Dagster's chart renders them into the instance ConfigMap
    (templates/configmap-instance.yaml): the run coordinator only when the daemon and the
    coordinator are enabled, run monitoring keys in snake case, ``additionalInstanceConfig``
    verbatim, and storage always dagster-postgres on the ``postgresql`` server."""
    daemon = values["dagsterDaemon"]
    coordinator = daemon["runCoordinator"]
    rendered = daemon["enabled"] and coordinator["enabled"]
    queued = coordinator["config"]["queuedRunCoordinator"]
    extra = values.get("additionalInstanceConfig", {})
    postgresql = values["postgresql"]
    return {
        "run_coordinator": coordinator["type"] if rendered else None,
        "dequeue_interval_seconds": queued.get("dequeueIntervalSeconds"),
        "max_concurrent_runs": queued.get("maxConcurrentRuns"),
        "tag_concurrency_limits": queued.get("tagConcurrencyLimits"),
        "run_monitoring": {_snake(k): v for k, v in daemon["runMonitoring"].items()},
        "telemetry": values["telemetry"],
        "nux": extra.get("nux"),
        "storage": ["postgres"] if postgresql["enabled"] or postgresql["postgresqlHost"] else [],
    }


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))


def test_helm_values_carry_the_local_instance_settings():
    local = local_instance_settings(_load("dagster.yaml"))
    helm = helm_instance_settings(_load("helm-values.yaml"))
    assert helm == local
    # What the comparison stands on, so an empty pair cannot pass.
    assert local["run_coordinator"] == "QueuedRunCoordinator"
    assert local["tag_concurrency_limits"] == [
        {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    ]
    assert local["storage"] == ["postgres"]


def test_helm_values_run_the_code_location_under_the_k8s_run_launcher():
    values = _load("helm-values.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    user = values["dagster-user-deployments"]
    assert user["enabled"]
    [deployment] = user["deployments"]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"]
    mounted = {m["mountPath"] for m in deployment["volumeMounts"]}
    [config_path] = [e["value"] for e in deployment["env"] if e["name"] == "ATLAS_CONFIG"]
    assert str(Path(config_path).parent) in mounted


def test_helm_storage_names_the_psycopg2_driver():
    # dagster-postgres builds "<scheme>://..."; without a driver SQLAlchemy 2.1 picks psycopg 3,
    # which is not installed.
    scheme = _load("helm-values.yaml")["postgresql"]["postgresqlScheme"]
    assert sa.engine.make_url(f"{scheme}://u@h/db").get_driver_name() == "psycopg2"


# --- the image ---------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def shell_commands(text: str) -> list[list[str]]:
    """A shell script's commands, split into words (comments dropped, one command a line)."""
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


def install_steps(commands: list[list[str]]) -> list[tuple[str, ...]]:
    """The venv and pip steps among ``commands``, without where the venv lives: ("venv",) for
    ``python -m venv DIR``, and ("pip", ...args) for ``python -m pip ...``, whose first item says
    whether that python is the venv's."""
    steps: list[tuple[str, ...]] = []
    venv = None
    for words in commands:
        if words[1:3] == ["-m", "venv"]:
            venv = words[3]
            steps.append(("venv",))
        elif words[1:3] == ["-m", "pip"]:
            in_venv = venv is not None and words[0] == f"{venv}/bin/python"
            steps.append(("pip", f"in_venv={in_venv}", *words[3:]))
    return steps


def project_install(step: tuple[str, ...]) -> tuple[tuple[str, ...], str, set[str]]:
    """(options other than -e, the project path, its extras) of a ``pip install PATH[extras]``."""
    *options, target = [word for word in step if word != "-e"]
    found = re.fullmatch(r"([^\[]+)(?:\[([^\]]*)\])?", target)
    assert found, target
    path, extras = found.groups()
    return tuple(options), path, set(filter(None, (extras or "").split(",")))


def _dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((DEPLOY / "Dockerfile").read_text(encoding="utf-8"))


def _image_steps() -> list[tuple[str, ...]]:
    return install_steps([shlex.split(a) for i, a in _dockerfile() if i == "RUN"])


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_image_installs_the_package_the_way_ci_does():
    ci = install_steps(shell_commands((ROOT / ".ci" / "run").read_text(encoding="utf-8")))
    image = _image_steps()
    assert [s[0] for s in ci] == [s[0] for s in image] == ["venv", "pip", "pip"]
    # The venv, then pip upgraded inside it, word for word.
    assert image[:2] == ci[:2]
    assert ci[1] == ("pip", "in_venv=True", "install", "--quiet", "--upgrade", "pip")
    # Then the project itself, from the same directory with the same options. CI installs it
    # editable with the test tools; the image installs a copy with the runtime extras.
    ci_options, ci_path, _ = project_install(ci[2])
    image_options, image_path, image_extras = project_install(image[2])
    assert "-e" not in image[2]
    assert (
        (image_options, image_path)
        == (ci_options, ci_path)
        == (
            ("pip", "in_venv=True", "install", "--quiet"),
            ".",
        )
    )
    optional = _pyproject()["project"]["optional-dependencies"]
    assert image_extras and image_extras <= set(optional) - {"dev"}


def test_the_image_gets_only_pinned_dependencies():
    project = _pyproject()["project"]
    _, _, extras = project_install(_image_steps()[2])
    requirements = project["dependencies"] + [
        r for extra in sorted(extras) for r in project["optional-dependencies"][extra]
    ]
    assert all("==" in r for r in requirements), requirements
    pins = dict(r.split("==") for r in requirements)
    # Dagster's integration libraries are released together: dagster-k8s on dagster-postgres's line.
    assert pins["dagster-k8s"] == pins["dagster-postgres"]


def test_image_copies_what_the_package_is_built_from():
    setuptools = _pyproject()["tool"]["setuptools"]
    needed = {"pyproject.toml"} | {f"{m}.py" for m in setuptools["py-modules"]}
    needed |= {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}
    copied = {
        Path(source).name
        for instruction, args in _dockerfile()
        if instruction == "COPY"
        for source in args.split()[:-1]
    }
    assert needed <= copied


def test_image_serves_the_code_location_the_helm_values_name():
    instructions = _dockerfile()
    [cmd] = [json.loads(a) for i, a in instructions if i == "CMD"]
    assert cmd[:3] == ["dagster", "api", "grpc"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    module = importlib.import_module(flags["-m"])
    assert isinstance(module.defs, dg.Definitions)
    assert [a for i, a in instructions if i == "EXPOSE"] == [flags["-p"]] == ["4000"]
    # The chart runs `dagster api grpc -h 0.0.0.0 -p <port>` followed by dagsterApiGrpcArgs.
    [deployment] = _load("helm-values.yaml")["dagster-user-deployments"]["deployments"]
    chart_args = ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(deployment["port"])]
    assert chart_args + deployment["dagsterApiGrpcArgs"] == cmd
