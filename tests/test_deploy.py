"""The deployment files in ``deploy/``, checked offline with BentoML's own code.

- ``deploy/bentocloud.yaml`` goes through what ``bentoml deploy -f`` runs: BentoML reads the file,
  resolves the Bento, structures the config with its schema classes and validates the scaling;
  only building and pushing the Bento and the call to BentoCloud are replaced. BentoML 1.4.40
  drops unknown keys without a word (``__forbid_extra_keys__ = False`` on every deployment schema,
  and ``config_overrides`` is validated by nobody here), so the file is structured once more with
  the same schema classes refusing unknown keys: a misspelled key fails instead of deploying
  without the setting.
- Its services are the Bento's services; its env and secret names are settings and its values parse.
- ``deploy/grafana/ingrain-bento.json`` queries only series the server exports: offline, against the
  series ``ingrain_bento/metrics.py`` declares plus BentoML's own; against a real scrape through
  ``assert_dashboard_metrics_exist`` (called from ``tests/test_e2e_clients.py``).
- The container: what ``deploy/container_check.sh`` found building and running it for real (it needs a
  Docker engine and is not run here), checked in the Dockerfile an offline ``bentoml build`` writes.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from fixtures.dashboard import (
    assert_dashboard_metrics_exist,
    dashboard_queries,
    load_dashboard,
    metric_names,
    panels_of,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = REPO / "deploy" / "bentocloud.yaml"

# The env vars each BentoCloud secret named in the deployment must hold
# (README Deploy: `bentoml secret create ingrain-api-key INGRAIN_API_KEY=<key>`).
SECRETS = {"ingrain-api-key": {"INGRAIN_API_KEY"}, "ingrain-runner-token": {"INGRAIN_RUNNER_TOKEN"}}
# BentoCloud's documented autoscaling behaviours (BentoML 1.4.40 types them as plain strings).
SCALE_BEHAVIORS = {"disabled", "stable", "fast"}

# BentoML's own series, as a real `GET /metrics` of this Bento shows them (BentoML 1.4.40).
BENTOML_SERIES = frozenset({
    "bentoml_service_request_total",
    "bentoml_service_request_in_progress",
    "bentoml_service_request_duration_seconds_bucket",
    "bentoml_service_request_duration_seconds_sum",
    "bentoml_service_request_duration_seconds_count",
    "bentoml_service_last_request_timestamp_seconds",
})
# PromQL functions, aggregations and keywords the dashboard may use: any other word is a series name.
WELL_FORMED = re.compile(r"^(ingrain|bentoml)_[a-z0-9_]*[a-z0-9]$")


# ---- deploy/bentocloud.yaml ---------------------------------------------------------

def load_deployment() -> dict[str, Any]:
    return yaml.safe_load(DEPLOYMENT.read_text())


def _bento_services() -> dict[str, Any]:
    import service

    return dict(service.IngrainBento.all_services())


def _strict_converter() -> Any:
    """BentoML's own cattrs converter for cloud schemas, refusing keys the schema classes lack."""
    import attr
    from bentoml._internal.utils.cattr import bentoml_cattr
    from cattrs.gen import make_dict_structure_fn

    strict = bentoml_cattr.copy()
    strict.register_structure_hook_factory(
        attr.has, lambda cls: make_dict_structure_fn(cls, strict, _cattrs_forbid_extra_keys=True))
    return strict


def _unknown_typed_dict_keys(value: dict[str, Any], schema: Any, where: str) -> list[str]:
    """Keys of ``value`` that the TypedDict ``schema`` (and the TypedDicts inside it) does not declare."""
    from typing_extensions import is_typeddict  # BentoML's schemas are typing_extensions TypedDicts

    hints = typing.get_type_hints(schema)
    problems = [f"unknown key {key!r} @ {where}" for key in value if key not in hints]
    for key, inner in value.items():
        if key in hints and isinstance(inner, dict) and is_typeddict(hints[key]):
            problems += _unknown_typed_dict_keys(inner, hints[key], f"{where}.{key}")
    return problems


def deployment_problems(config: dict[str, Any]) -> list[str]:
    """Why BentoML's deployment schema (keys refused when unknown) or its service-config schema
    (for ``config_overrides``) would not take ``config`` as written; empty when both do."""
    import cattrs
    from _bentoml_sdk.service.config import ServiceConfig
    from _bentoml_sdk.service.config import validate as validate_service_config
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema

    body = {key: value for key, value in config.items() if key != "cluster"}  # BentoML pops it first
    try:
        _strict_converter().structure(body, CreateDeploymentSchema)
    except cattrs.BaseValidationError as error:
        return list(cattrs.transform_error(error))
    problems = []
    for name, svc in (config.get("services") or {}).items():
        overrides = svc.get("config_overrides") or {}
        problems += _unknown_typed_dict_keys(overrides, ServiceConfig, f"$.services[{name!r}].config_overrides")
        try:
            validate_service_config(overrides)
        except ValueError as error:
            problems.append(f"$.services[{name!r}].config_overrides: {error}")
    return problems


class _Sent(Exception):
    def __init__(self, schema: Any, cluster: str | None) -> None:
        self.schema, self.cluster = schema, cluster


def test_bentoml_deploy_reads_the_file_and_sends_both_services(monkeypatch):
    """`bentoml deploy -f deploy/bentocloud.yaml`, offline: BentoML's DeploymentConfigParameters and
    DeploymentAPI.create, with the Bento build/push and the BentoCloud call replaced."""
    from bentoml._internal.cloud import deployment as cloud
    from bentoml._internal.tag import Tag

    services = _bento_services()
    front = next(iter(services))
    built: list[dict[str, Any]] = []

    def ensure_bento(**kwargs: Any) -> Any:  # `bento: .` would build the Bento here and push it
        built.append(kwargs)
        return SimpleNamespace(tag=Tag("ingrain-bento", "offline"), entry_service=front, envs=[])

    def create_deployment(create_schema: Any, cluster: str | None) -> Any:
        raise _Sent(create_schema, cluster)

    monkeypatch.setattr(cloud, "ensure_bento", ensure_bento)
    client = SimpleNamespace(v2=SimpleNamespace(create_deployment=create_deployment))
    params = cloud.DeploymentConfigParameters(config_file=str(DEPLOYMENT), path_context=str(REPO))
    params.verify(_client=client)
    with pytest.raises(_Sent) as sent:
        cloud.DeploymentAPI(client).create(params)

    assert built and built[0]["project_path"] == "."
    schema = sent.value.schema
    assert schema.bento == "ingrain-bento:offline" and schema.name == "ingrain-bento"
    assert set(schema.services) == set(services)
    assert schema.secrets == list(SECRETS)
    for svc in schema.services.values():
        assert svc.instance_type and 1 <= svc.scaling.min_replicas <= svc.scaling.max_replicas


def test_the_file_has_no_key_bentoml_would_drop():
    assert deployment_problems(load_deployment()) == []


def _renamed(config: dict[str, Any], path: tuple[Any, ...], new_key: str) -> dict[str, Any]:
    mutated = copy.deepcopy(config)
    parent = mutated
    for key in path[:-1]:
        parent = parent[key]
    parent[new_key] = parent.pop(path[-1])
    return mutated


@pytest.mark.parametrize(("path", "typo"), [
    (("secrets",), "secret"),
    (("services", "ingrain-runner", "scaling"), "scalling"),
    (("services", "ingrain-bento", "scaling", "max_replicas"), "max_replica"),
    (("services", "ingrain-bento", "scaling", "policy", "scale_up_behavior"), "scale_up_behaviour"),
    (("services", "ingrain-runner", "instance_type"), "instance-type"),
    (("services", "ingrain-bento", "config_overrides", "traffic", "concurrency"), "concurency"),
    (("services", "ingrain-runner", "config_overrides", "workers"), "worker"),
])
def test_a_misspelled_key_is_refused(path, typo):
    problems = deployment_problems(_renamed(load_deployment(), path, typo))
    assert any(typo in problem for problem in problems), problems


def test_a_value_of_the_wrong_type_is_refused():
    config = load_deployment()
    config["services"]["ingrain-runner"]["config_overrides"]["workers"] = 0
    assert deployment_problems(config)


def test_the_services_are_exactly_the_bentos_services():
    import service

    assert set(load_deployment()["services"]) == set(_bento_services()) \
        == {service.IngrainBento.name, service.IngrainRunner.name}


def test_the_front_scales_on_cpu_and_the_runner_has_one_worker_on_one_gpu():
    from bentoml._internal.cloud.schemas.modelschemas import DeploymentStrategy

    import service

    services = load_deployment()["services"]
    front, runner = services[service.IngrainBento.name], services[service.IngrainRunner.name]
    assert front["instance_type"].startswith("cpu.") and runner["instance_type"].startswith("gpu.")
    assert front["scaling"]["max_replicas"] > front["scaling"]["min_replicas"] >= 1
    assert front["config_overrides"]["traffic"]["concurrency"] >= 1  # the scaling rule
    assert runner["config_overrides"]["workers"] == 1 and runner["config_overrides"]["resources"]["gpu"] == 1
    for svc in services.values():
        policy = svc["scaling"].get("policy") or {}
        assert {policy[key] for key in ("scale_up_behavior", "scale_down_behavior") if key in policy} \
            <= SCALE_BEHAVIORS
        if "deployment_strategy" in svc:
            assert svc["deployment_strategy"] in {strategy.value for strategy in DeploymentStrategy}


def _setting_names() -> set[str]:
    from ingrain_bento.settings import Settings

    return {field.validation_alias.choices[0] for field in Settings.model_fields.values()}  # type: ignore[union-attr]


def _envs(config: dict[str, Any], service_name: str) -> dict[str, Any]:
    """What one service's processes see: the deployment's envs, then the service's own on top."""
    items = (config.get("envs") or []) + (config["services"][service_name].get("envs") or [])
    return {item["name"]: item["value"] for item in items}


def test_env_and_secret_names_are_settings_and_the_api_key_is_only_a_secret():
    config = load_deployment()
    assert set(config["secrets"]) == set(SECRETS)
    names = {name for svc in config["services"] for name in _envs(config, svc)}
    assert names | set().union(*SECRETS.values()) <= _setting_names()
    assert "INGRAIN_API_KEY" not in names, "the API key belongs in a BentoCloud secret, not in plain envs"


def test_env_values_are_strings_that_the_settings_accept(monkeypatch):
    from ingrain_bento.model_list import read_model_list
    from ingrain_bento.settings import Settings

    for name in _setting_names():
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    config = load_deployment()
    secret_values = {name: "from-the-secret" for names in SECRETS.values() for name in names}
    for svc in config["services"]:
        envs = _envs(config, svc)
        assert all(isinstance(value, str) for value in envs.values()), f"{svc}: quote env values in YAML"
        Settings.model_validate({**envs, **secret_values})
        if "INGRAIN_PRELOAD" in envs:
            assert read_model_list(REPO / envs["INGRAIN_PRELOAD"]), "the preload list is baked from the repo"


# ---- deploy/grafana/ingrain-bento.json -----------------------------------------------

def ingrain_series() -> set[str]:
    """The sample names ingrain_bento/metrics.py exports, as prometheus_client names them."""
    from ingrain_bento.metrics import RequestMetrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {family.name + suffix for metric in vars(RequestMetrics().series).values()
            for family in metric.describe() for suffix in suffixes[family.type]}


def unknown_series(expr: str) -> set[str]:
    known = ingrain_series() | BENTOML_SERIES
    return {name for name in metric_names(expr) if name not in known or not WELL_FORMED.match(name)}


def test_every_dashboard_query_reads_known_well_formed_series():
    queries = dashboard_queries(load_dashboard())
    assert len(queries) > 20
    unknown = {query: sorted(unknown_series(query)) for query in queries if unknown_series(query)}
    assert not unknown, unknown


@pytest.mark.parametrize(("expr", "culprit"), [
    ('sum by (model) (rate(ingrain_item_total{model=~"$model"}[$__rate_interval]))', "ingrain_item_total"),
    ("histogram_quantile(0.9, sum by (le) (rate(ingrain_batch_size[5m])))", "ingrain_batch_size"),
    ("histogram_quantle(0.9, sum by (le) (rate(ingrain_batch_size_bucket[5m])))", "histogram_quantle"),
    ("sum(rate(bentoml_service_requests_total[1m]))", "bentoml_service_requests_total"),
])
def test_a_misspelled_series_or_function_is_caught(expr, culprit):
    assert culprit in unknown_series(expr)


def test_the_dashboard_shows_every_ingrain_series():
    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|sum|count)$", "", name)

    used = set().union(*(metric_names(query) for query in dashboard_queries(load_dashboard())))
    assert {family(name) for name in ingrain_series()} <= {family(name) for name in used}


def test_percentiles_come_from_bucket_series_grouped_by_le():
    calls = [call for query in dashboard_queries(load_dashboard())
             for call in re.findall(r"histogram_quantile\((.*)", query)]
    assert calls
    for call in calls:
        assert {name.endswith("_bucket") for name in metric_names(call)} == {True}, call
        assert re.search(r"\bby \((le\b[^)]*)\)", call), call


def test_the_dashboard_imports_on_any_prometheus_and_names_the_bentos_services():
    dashboard = load_dashboard()
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(panels_of(dashboard["panels"]))
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        for target in panel.get("targets", []):
            assert panel["datasource"]["uid"] == target["datasource"]["uid"] == "${datasource}", panel["title"]
    named = {name for query in dashboard_queries(dashboard) for name in re.findall(r'service_name="([^"]+)"', query)}
    assert named and named <= set(_bento_services())


def test_the_scrape_check_fails_when_a_series_is_missing():
    text = "# TYPE ingrain_resident_models gauge\ningrain_resident_models 1.0\n"
    with pytest.raises(AssertionError, match="ingrain_items_total"):
        assert_dashboard_metrics_exist(text)


# ---- the container (bentofile.yaml's docker section; deploy/container_check.sh) -------------

CONTAINER_CHECK = REPO / "deploy" / "container_check.sh"


@pytest.fixture(scope="module")
def dockerfile(tmp_path_factory) -> list[str]:
    """The lines of the Dockerfile an offline ``bentoml build`` writes for the Bento as it is."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {key: value for key, value in os.environ.items() if key != "INGRAIN_PRELOAD"}
    build = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=REPO,
                           env={**env, "BENTOML_HOME": str(home)}, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    name, version = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:").split(":")
    return (home / "bentos" / name / version / "env" / "docker" / "Dockerfile").read_text().splitlines()


def _first(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


def test_pip_is_installed_before_bentoml_installs_uv_with_it(dockerfile):
    """BentoML installs uv with ``pip install`` into the base image's Python. nvidia/cuda images
    have no pip (the build stopped at ``pip: not found`` on a base without it), and the system
    Python of Ubuntu 24.04 (and Debian 12) refuses a pip install (PEP 668) unless
    PIP_BREAK_SYSTEM_PACKAGES is set."""
    uv = _first(dockerfile, "pip install --no-cache-dir --require-hashes")
    assert [line for line in dockerfile[:uv] if line.startswith("RUN apt-get install") and "python3-pip" in line]
    assert _first(dockerfile, "ARG PIP_BREAK_SYSTEM_PACKAGES=1") < uv
    assert _first(dockerfile, "ENV PIP_BREAK_SYSTEM_PACKAGES=$PIP_BREAK_SYSTEM_PACKAGES") < uv


def test_the_dockerfile_needs_no_buildkit(dockerfile):
    """No build-time secret or cache mount: Docker's classic builder builds it, which
    container_check.sh uses where the Docker client has no buildx plugin (BuildKit)."""
    assert not [line for line in dockerfile if "--mount=" in line or line.startswith("# syntax")]


def test_nothing_in_the_image_overrides_the_servers_port(dockerfile):
    """The server listens on INGRAIN_PORT (8687 by default), read when the container starts. BentoML's
    entrypoint turns $PORT into BENTOML_PORT, which would override it: the image sets neither.
    (EXPOSE 3000 is BentoML's template: metadata only, `-p 8687:8687` publishes the server.)"""
    assert not [line for line in dockerfile if re.match(r"(ENV|ARG) (PORT|BENTOML_PORT|INGRAIN_PORT)\b", line)]
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert not {env["name"] for env in bentofile["envs"]} & {"PORT", "BENTOML_PORT", "INGRAIN_PORT"}


def test_the_container_checks_bentofile_changes_only_the_base_image(tmp_path):
    """container_check.sh builds the same Bento on a local base: bentofile.yaml with only
    docker.base_image changed (``bentoml build -f``), so the Dockerfile differs in its FROM line only."""
    out = tmp_path / "bentofile.local.yaml"
    subprocess.run([sys.executable, str(REPO / "deploy" / "container_check.py"), "bentofile", "local/base:1", str(out)],
                   check=True, timeout=60)
    original = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    changed = yaml.safe_load(out.read_text())
    assert changed["docker"].pop("base_image") == "local/base:1"
    original["docker"].pop("base_image")
    assert changed == original


def test_the_container_check_script_parses():
    """The script itself needs Docker and is not run by the tests (pytest collects ``tests/`` only)."""
    subprocess.run(["bash", "-n", str(CONTAINER_CHECK)], check=True, timeout=30)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(CONTAINER_CHECK)], check=True, timeout=60)
