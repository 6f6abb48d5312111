"""The deployment files in ``deploy/``, checked offline with BentoML's own code.

- ``deploy/bentocloud.yaml`` goes through what ``bentoml deploy -f`` runs: BentoML reads the file,
  resolves the Bento, structures the config with its schema classes and validates the scaling;
  only building and pushing the Bento and the call to BentoCloud are replaced. BentoML 1.4.40
  drops unknown keys without a word (``__forbid_extra_keys__ = False`` on every deployment schema,
  and ``config_overrides`` is validated by nobody here), so the file is structured once more with
  the same schema classes refusing unknown keys: a misspelled key fails instead of deploying
  without the setting.
- Its services are the Bento's services; its env and secret names are settings (or the S3 client's
  standard ``AWS_*`` variables, which the installed boto3 is shown to read) and its values parse;
  the runner scales out on the shared model state.
- ``deploy/kubernetes/`` (the ``bentoml containerize`` image on a cluster): every document validated
  strictly against the Kubernetes schemas ``kubernetes-validate`` ships, then what those schemas do
  not see: the container args parse with BentoML's own ``start-http-server`` command and serve each
  Bento service once, the front's ``--depends`` is the runner Service, probes, GPU, env names and
  values, Secret and ConfigMap references, selectors, autoscalers and disruption budgets. Each check
  is also run on a broken copy of the manifests and must name the break.
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
import urllib.parse
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
# (README Deploy: `bentoml secret create ingrain-api-key INGRAIN_API_KEY=<key>`); the Kubernetes
# Secrets of deploy/kubernetes/ have the same names and keys.
SECRETS = {
    "ingrain-api-key": {"INGRAIN_API_KEY"},
    "ingrain-runner-token": {"INGRAIN_RUNNER_TOKEN"},
    # INGRAIN_SHARED_STORE's bucket: the S3 client's variables (AWS_ENDPOINT_URL is optional).
    "ingrain-shared-store": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"},
}
# Not settings of ours: the standard variables of the S3 client (boto3) that INGRAIN_SHARED_STORE
# uses. test_the_s3_client_reads_these_variables shows the installed boto3 reads each of them
# (it takes no region from AWS_REGION: that one is not allowed).
S3_CLIENT_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"})
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
    assert names | set().union(*SECRETS.values()) <= _setting_names() | S3_CLIENT_ENV
    assert "INGRAIN_API_KEY" not in names, "the API key belongs in a BentoCloud secret, not in plain envs"
    assert not names & S3_CLIENT_ENV, "the S3 credentials belong in the secret ingrain-shared-store"


def test_the_s3_client_reads_these_variables(monkeypatch):
    """Each allowed ``AWS_*`` name reaches the S3 client boto3 builds (offline: no call is made)."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    values = {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "key-secret",
              "AWS_DEFAULT_REGION": "eu-west-3", "AWS_ENDPOINT_URL": "http://s3.example.internal:9000"}
    assert set(values) == S3_CLIENT_ENV
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    client = boto3.session.Session().client("s3")
    credentials = client._request_signer._credentials
    seen = {"AWS_ACCESS_KEY_ID": credentials.access_key, "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
            "AWS_DEFAULT_REGION": client.meta.region_name, "AWS_ENDPOINT_URL": client.meta.endpoint_url}
    assert seen == values


def test_the_runner_scales_out_on_the_shared_store():
    """Several runner replicas serve the same models only through INGRAIN_SHARED_STORE: each one
    with one worker per GPU, replaced in a rolling update."""
    from ingrain_bento.settings import Settings

    import service

    config = load_deployment()
    runner = config["services"][service.IngrainRunner.name]
    envs = _envs(config, service.IngrainRunner.name)
    scaling = runner["scaling"]
    assert scaling["max_replicas"] > scaling["min_replicas"] >= 2
    assert runner["deployment_strategy"] == "RollingUpdate"
    assert "ingrain-shared-store" in config["secrets"]
    assert Settings.model_validate(envs).shared_store == envs["INGRAIN_SHARED_STORE"]
    assert int(envs["INGRAIN_RUNNERS"]) == runner["config_overrides"]["workers"] \
        == runner["config_overrides"]["resources"]["gpu"]
    assert runner["config_overrides"]["traffic"]["concurrency"] >= 1  # BentoCloud scales only with a rule


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


# ---- deploy/kubernetes/ ------------------------------------------------------------------
# Each check returns the problems it finds (empty: none), so that each is also run on a copy of the
# manifests broken on purpose (test_each_check_names_a_break), which it must report.

KUBERNETES = REPO / "deploy" / "kubernetes"
KUSTOMIZATION = KUBERNETES / "kustomization.yaml"
# The oldest Kubernetes the manifests are validated against (nothing older is maintained upstream);
# the newest is the newest that the installed kubernetes-validate ships (1.37 with its 1.37.0).
OLDEST_KUBERNETES = "1.30"
PLACEHOLDERS = {"secret": "from-the-secret", "metadata.name": "ingrain-runner-7c9f8d6b5-x2k4q"}

Docs = list[dict[str, Any]]


def kubernetes_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.glob("*.yaml") if path != KUSTOMIZATION)


def kubernetes_documents() -> Docs:
    return [doc for path in kubernetes_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def _of_kind(docs: Docs, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _named(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    return next(doc for doc in _of_kind(docs, kind) if doc["metadata"]["name"] == name)


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def _selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _port_number(container: dict[str, Any], port: int | str) -> int | None:
    """A container port given by number or by name, or None when the container has no such port."""
    for declared in container.get("ports") or []:
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    return None


def _kubernetes_versions() -> list[str]:
    from kubernetes_validate.utils import all_versions, major_minor
    from packaging.version import Version

    shipped = sorted({major_minor(version) for version in all_versions()}, key=Version)
    return [version for version in shipped if Version(version) >= Version(OLDEST_KUBERNETES)]


def schema_problems(docs: Docs) -> list[str]:
    """kubernetes-validate in strict mode (unknown fields fail), for every Kubernetes version from
    OLDEST_KUBERNETES to the newest it ships."""
    import kubernetes_validate

    problems = []
    for version in _kubernetes_versions():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(item) for item in error.path)
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {where}: {error.message}")
    return problems


def namespace_problems(docs: Docs) -> list[str]:
    namespaces = {doc["metadata"]["name"] for doc in _of_kind(docs, "Namespace")}
    if len(namespaces) != 1:
        return [f"one Namespace expected, found {sorted(namespaces)}"]
    return [f"{doc['kind']}/{doc['metadata']['name']} is in {doc['metadata'].get('namespace')!r}, not {namespaces}"
            for doc in docs if doc["kind"] != "Namespace" and doc["metadata"].get("namespace") not in namespaces]


def _start_http_server(container: dict[str, Any]) -> Any:
    """The container's args as BentoML's own ``start-http-server`` command parses them, after the
    image's entrypoint appended ``$BENTO_PATH``: click's parameters, or a ValueError."""
    import click
    from bentoml._internal.container.generate import BENTO_PATH  # the image's $BENTO_PATH
    from bentoml_cli._internal.start import start_command

    args = list(container.get("args") or [])
    if container.get("command") or not args or args[0] != "start-http-server":
        raise ValueError("no `command`, and args starting with start-http-server (the image's entrypoint runs it)")
    command = start_command.commands["start-http-server"]
    try:
        with command.make_context("start-http-server", [*args[1:], BENTO_PATH]) as context:
            return SimpleNamespace(**context.params)
    except click.ClickException as error:
        raise ValueError(error.format_message()) from error


def bentoml_cli_problems(docs: Docs) -> list[str]:
    """Each Deployment's container serves one Bento service with ``start-http-server``, which the
    image's entrypoint (BentoML's, in the installed package) runs; together they serve every
    Bento service once; each listens on its container port."""
    import bentoml

    entrypoint = (Path(bentoml.__file__).parent / "_internal" / "container" / "frontend" / "dockerfile"
                  / "entrypoint.sh").read_text()
    problems = [] if "bentoml_cli._internal.start" in entrypoint and "'start-http-server'" in entrypoint \
        else ["the image's entrypoint no longer runs start-http-server"]
    served = []
    for deployment in _of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        for container in _containers(deployment):
            try:
                params = _start_http_server(container)
            except ValueError as error:
                problems.append(f"{name}: {error}")
                continue
            served.append(params.service_name)
            if params.port is None or _port_number(container, params.port) is None:
                problems.append(f"{name}: --port {params.port} is not a port of the container")
    if sorted(served) != sorted(_bento_services()):
        problems.append(f"the Deployments serve {sorted(served)}, the Bento has {sorted(_bento_services())}")
    return problems


def _service_for(docs: Docs, host: str, port: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The Service (and its port) that ``host:port`` names from a pod of the namespace."""
    for svc in _of_kind(docs, "Service"):
        name, namespace = svc["metadata"]["name"], svc["metadata"].get("namespace")
        if host in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"):
            for declared in svc["spec"]["ports"]:
                if declared["port"] == port:
                    return svc, declared
    return None


def runner_address_problems(docs: Docs) -> list[str]:
    """The front's ``--depends ingrain-runner=URL`` (BentoML hands it to the workers as
    BENTOML_RUNNER_MAP) is the runner Service, whose port leads to the runner's ``--port``."""
    import service

    front = _named(docs, "Deployment", service.IngrainBento.name)
    runner = _named(docs, "Deployment", service.IngrainRunner.name)
    problems = []
    for deployment in (front, runner):
        for container in _containers(deployment):
            if "BENTOML_RUNNER_MAP" in {env["name"] for env in container.get("env") or []}:
                problems.append(f"{deployment['metadata']['name']}: BENTOML_RUNNER_MAP is overwritten by BentoML's "
                                "serve_http (from --depends): set --depends instead")
    try:
        front_params = _start_http_server(_containers(front)[0])
        runner_params = _start_http_server(_containers(runner)[0])
    except ValueError as error:
        return [*problems, str(error)]
    if runner_params.depends:
        problems.append(f"the runner depends on nothing, not {runner_params.depends}")
    depends = dict(item.split("=", 1) for item in front_params.depends)
    if set(depends) != {service.IngrainRunner.name}:
        return [*problems, f"the front's --depends names {sorted(depends)}, not {service.IngrainRunner.name}"]
    url = urllib.parse.urlsplit(depends[service.IngrainRunner.name])
    found = _service_for(docs, url.hostname or "", url.port or 80) if url.scheme == "http" else None
    if found is None:
        return [*problems, f"the front calls {url.geturl()}: no Service has that name and port"]
    svc, port = found
    if not _selects(svc["spec"]["selector"], runner):
        problems.append(f"the front calls the Service {svc['metadata']['name']}, which does not select the runner")
    target = _port_number(_containers(runner)[0], port.get("targetPort", port["port"]))
    if target is None or target != int(runner_params.port):
        problems.append(f"the runner Service's port leads to {target}, the runner listens on {runner_params.port}")
    return problems


def probe_problems(docs: Docs) -> list[str]:
    """BentoML's probes, on the port the service listens on: readiness /readyz (503 until the service
    is ready: for a runner, converged to the shared model state), liveness and start-up /livez."""
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/livez", "startupProbe": "/livez"}
    problems = []
    for deployment in _of_kind(docs, "Deployment"):
        for container in _containers(deployment):
            where = f"{deployment['metadata']['name']}/{container['name']}"
            try:
                port = int(_start_http_server(container).port)
            except (ValueError, TypeError) as error:
                problems.append(f"{where}: {error}")
                continue
            for probe, path in expected.items():
                get = (container.get(probe) or {}).get("httpGet")
                if get is None:
                    if probe != "startupProbe":
                        problems.append(f"{where}: no {probe} over HTTP")
                    continue
                if get.get("path") != path or _port_number(container, get["port"]) != port:
                    problems.append(f"{where}: {probe} is {get.get('path')} on {get['port']}, not {path} on {port}")
    return problems


def _env(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((env for env in container.get("env") or [] if env["name"] == name), None)


def gpu_problems(docs: Docs) -> list[str]:
    """The runner: one GPU per pod (requested, and limited: an extended resource needs both equal),
    one runner worker for it, several replicas that name themselves after their pod and share the
    model state; the front asks for no GPU."""
    import service

    runner = _named(docs, "Deployment", service.IngrainRunner.name)
    container = _containers(runner)[0]
    resources = container.get("resources") or {}
    gpus = {part: str((resources.get(part) or {}).get("nvidia.com/gpu")) for part in ("requests", "limits")}
    problems = [] if gpus == {"requests": "1", "limits": "1"} else [f"the runner's nvidia.com/gpu: {gpus}"]
    if (_env(container, "INGRAIN_RUNNERS") or {}).get("value") != "1":
        problems.append("the runner pod has one GPU: INGRAIN_RUNNERS=1")
    if (runner["spec"].get("replicas") or 1) < 2:
        problems.append("the runner has several replicas")
    replica_id = ((_env(container, "INGRAIN_REPLICA_ID") or {}).get("valueFrom") or {}).get("fieldRef") or {}
    if replica_id.get("fieldPath") != "metadata.name":
        problems.append("INGRAIN_REPLICA_ID is the pod's name (downward API)")
    if _env(container, "INGRAIN_SHARED_STORE") is None:
        problems.append("the runner replicas share their state: INGRAIN_SHARED_STORE")
    for deployment in _of_kind(docs, "Deployment"):
        if deployment is not runner and any("nvidia.com/gpu" in str(c.get("resources"))
                                            for c in _containers(deployment)):
            problems.append(f"{deployment['metadata']['name']} asks for a GPU")
    return problems


def env_name_problems(docs: Docs) -> list[str]:
    """Every variable is a setting, one of the S3 client's variables or one of BentoML's; a setting
    that is a secret, and the S3 credentials, never as a plain value."""
    allowed = _setting_names() | S3_CLIENT_ENV
    secret_only = {"INGRAIN_API_KEY", "INGRAIN_RUNNER_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    problems = []
    for deployment in _of_kind(docs, "Deployment"):
        for container in _containers(deployment):
            where = f"{deployment['metadata']['name']}/{container['name']}"
            if container.get("envFrom"):
                problems.append(f"{where}: name each variable (env), so that each is checked")
            for env in container.get("env") or []:
                if env["name"] not in allowed and not env["name"].startswith("BENTOML_"):
                    problems.append(f"{where}: {env['name']} is no setting")
                if env["name"] in secret_only and "secretKeyRef" not in (env.get("valueFrom") or {}):
                    problems.append(f"{where}: {env['name']} comes from a Secret")
    return problems


def _resolved_env(docs: Docs, container: dict[str, Any]) -> dict[str, str]:
    """The container's settings as a pod sees them (Secrets as placeholders)."""
    values = {}
    for env in container.get("env") or []:
        source = env.get("valueFrom") or {}
        if "value" in env:
            values[env["name"]] = env["value"]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            values[env["name"]] = _named(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in source:
            values[env["name"]] = PLACEHOLDERS["secret"]
        elif "fieldRef" in source:
            values[env["name"]] = PLACEHOLDERS[source["fieldRef"]["fieldPath"]]
    return values


def env_value_problems(docs: Docs) -> list[str]:
    """What each container's settings read from their values (ConfigMaps resolved) is valid."""
    import pydantic

    from ingrain_bento.model_list import read_model_list
    from ingrain_bento.settings import Settings

    problems = []
    for deployment in _of_kind(docs, "Deployment"):
        for container in _containers(deployment):
            where = f"{deployment['metadata']['name']}/{container['name']}"
            try:
                envs = _resolved_env(docs, container)
                Settings.model_validate({key: value for key, value in envs.items() if key in _setting_names()})
            except (KeyError, StopIteration) as error:
                problems.append(f"{where}: a reference to nothing: {error!r}")
                continue
            except pydantic.ValidationError as error:
                problems.append(f"{where}: {error}")
                continue
            if "INGRAIN_PRELOAD" in envs and not (REPO / envs["INGRAIN_PRELOAD"]).is_file():
                problems.append(f"{where}: INGRAIN_PRELOAD {envs['INGRAIN_PRELOAD']} is not in the repository")
            elif "INGRAIN_PRELOAD" in envs:
                read_model_list(REPO / envs["INGRAIN_PRELOAD"])
            if envs.get("INGRAIN_ENGINE_PROCESS") != "runner":
                problems.append(f"{where}: the models live in the runners: INGRAIN_ENGINE_PROCESS=runner")
    return problems


def secret_problems(docs: Docs) -> list[str]:
    """The Secrets are those deploy/bentocloud.yaml names, holding the same variables: every key is read,
    each as the variable it holds; both services read the same runner token."""
    import service

    problems, referenced, token_refs = [], set(), {}
    for deployment in _of_kind(docs, "Deployment"):
        for container in _containers(deployment):
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref is None:
                    continue
                referenced.add((ref["name"], ref["key"]))
                if ref["key"] not in SECRETS.get(ref["name"], set()) or ref["key"] != env["name"]:
                    problems.append(f"{env['name']} from {ref['name']}/{ref['key']}: not a secret of {SECRETS}")
                if ref.get("optional") and env["name"] != "AWS_ENDPOINT_URL":
                    problems.append(f"{env['name']} is required (only AWS_ENDPOINT_URL is optional)")
                if env["name"] == "INGRAIN_RUNNER_TOKEN":
                    token_refs[deployment["metadata"]["name"]] = (ref["name"], ref["key"])
    every = {(name, key) for name, keys in SECRETS.items() for key in keys}
    if referenced != every:
        problems.append(f"the Deployments read {sorted(referenced)} of the secrets, not {sorted(every)}")
    services = {service.IngrainBento.name, service.IngrainRunner.name}
    if set(token_refs) != services or len(set(token_refs.values())) != 1:
        problems.append(f"front and runner read INGRAIN_RUNNER_TOKEN from one Secret: {token_refs}")
    front = _named(docs, "Deployment", service.IngrainBento.name)
    if _env(_containers(front)[0], "INGRAIN_API_KEY") is None:
        problems.append("the front's routes are guarded: INGRAIN_API_KEY")
    return problems


def configmap_problems(docs: Docs) -> list[str]:
    """Every configMapKeyRef names a key that exists (optional or not), and every key is read."""
    problems, read = [], set()
    for deployment in _of_kind(docs, "Deployment"):
        for container in _containers(deployment):
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref is None:
                    continue
                read.add((ref["name"], ref["key"]))
                maps = [doc for doc in _of_kind(docs, "ConfigMap") if doc["metadata"]["name"] == ref["name"]]
                if not maps or ref["key"] not in (maps[0].get("data") or {}) or ref["key"] != env["name"]:
                    problems.append(f"{env['name']}: no key {ref['key']} in a ConfigMap {ref['name']}")
    for config_map in _of_kind(docs, "ConfigMap"):
        for key in config_map.get("data") or {}:
            if (config_map["metadata"]["name"], key) not in read:
                problems.append(f"ConfigMap {config_map['metadata']['name']}: {key} is read by no container")
    return problems


def selector_problems(docs: Docs) -> list[str]:
    """Each Deployment's selector matches its pods; each Service selects the pods of exactly one
    Deployment, on a port its containers have."""
    deployments = _of_kind(docs, "Deployment")
    problems = [f"Deployment {d['metadata']['name']}: its selector does not match its pods"
                for d in deployments if not _selects(d["spec"]["selector"]["matchLabels"], d)]
    for svc in _of_kind(docs, "Service"):
        selected = [d for d in deployments if _selects(svc["spec"].get("selector") or {}, d)]
        if len(selected) != 1:
            problems.append(f"Service {svc['metadata']['name']} selects {[d['metadata']['name'] for d in selected]}")
            continue
        for port in svc["spec"]["ports"]:
            if _port_number(_containers(selected[0])[0], port.get("targetPort", port["port"])) is None:
                problems.append(f"Service {svc['metadata']['name']}: port {port} leads to no container port")
    return problems


def autoscaling_problems(docs: Docs) -> list[str]:
    """HorizontalPodAutoscalers scale an existing Deployment that leaves its replicas to them, on a
    resource its containers request; PodDisruptionBudgets cover exactly one Deployment and let a
    drain take a pod while one stays."""
    problems = []
    replicas: dict[str, int] = {}
    for hpa in _of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        found = [d for d in _of_kind(docs, "Deployment") if d["metadata"]["name"] == target["name"]]
        if (target["apiVersion"], target["kind"]) != ("apps/v1", "Deployment") or not found:
            problems.append(f"HorizontalPodAutoscaler {hpa['metadata']['name']}: no Deployment {target}")
            continue
        if "replicas" in found[0]["spec"]:
            problems.append(f"Deployment {target['name']}: its HorizontalPodAutoscaler owns replicas, leave them out")
        for metric in hpa["spec"].get("metrics") or []:
            resource = (metric.get("resource") or {}).get("name")
            if resource and not all(resource in ((c.get("resources") or {}).get("requests") or {})
                                    for c in _containers(found[0])):
                problems.append(f"Deployment {target['name']}: utilization of {resource} needs requests.{resource}")
        if not 1 <= hpa["spec"].get("minReplicas", 1) < hpa["spec"]["maxReplicas"]:
            problems.append(f"HorizontalPodAutoscaler {hpa['metadata']['name']}: minReplicas < maxReplicas")
        replicas[target["name"]] = hpa["spec"].get("minReplicas", 1)
    for deployment in _of_kind(docs, "Deployment"):
        replicas.setdefault(deployment["metadata"]["name"], deployment["spec"].get("replicas", 1))
    covered = set()
    for pdb in _of_kind(docs, "PodDisruptionBudget"):
        selected = [d for d in _of_kind(docs, "Deployment") if _selects(pdb["spec"]["selector"]["matchLabels"], d)]
        if len(selected) != 1:
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']} covers {len(selected)} Deployments")
            continue
        name = selected[0]["metadata"]["name"]
        covered.add(name)
        least = replicas[name]
        available = least - pdb["spec"]["maxUnavailable"] if "maxUnavailable" in pdb["spec"] \
            else pdb["spec"]["minAvailable"]
        if not 1 <= available < least:
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']}: {available} of {least} pods must stay")
    if covered != {d["metadata"]["name"] for d in _of_kind(docs, "Deployment")}:
        problems.append(f"PodDisruptionBudgets cover {sorted(covered)}, not every Deployment")
    runner = [d for d in _of_kind(docs, "Deployment") if d["metadata"]["name"] == "ingrain-runner"]
    rolling = (runner[0]["spec"].get("strategy") or {}) if runner else {}
    unavailable = (rolling.get("rollingUpdate") or {}).get("maxUnavailable", "25%")
    if rolling.get("type") != "RollingUpdate" or not isinstance(unavailable, int) \
            or not 0 <= unavailable < replicas.get("ingrain-runner", 1):
        problems.append(f"the runners are replaced in a rolling update that keeps one serving: {rolling}")
    return problems


def image_problems(docs: Docs) -> list[str]:
    """Front and runner run one image (the same Bento on both ends of the wire), the one the
    kustomization's `images` rewrites; the kustomization lists every file here."""
    images = {c["image"] for d in _of_kind(docs, "Deployment") for c in _containers(d)}
    if len(images) != 1:
        return [f"front and runner run one image, not {sorted(images)}"]
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    problems = []
    if sorted(kustomization["resources"]) != [path.name for path in kubernetes_files()]:
        problems.append(f"kustomization.yaml lists {kustomization['resources']}, the folder has "
                        f"{[path.name for path in kubernetes_files()]}")
    names = {entry["name"] for entry in kustomization.get("images") or []}
    if names != {images.pop().rsplit(":", 1)[0]}:
        problems.append(f"kustomization.yaml's images {sorted(names)} rewrite no image of the Deployments")
    return problems


CHECKS = {check.__name__: check for check in (
    schema_problems, namespace_problems, bentoml_cli_problems, runner_address_problems, probe_problems,
    gpu_problems, env_name_problems, env_value_problems, secret_problems, configmap_problems,
    selector_problems, autoscaling_problems, image_problems)}


@pytest.mark.parametrize("check", CHECKS)
def test_the_kubernetes_manifests_pass(check):
    assert CHECKS[check](kubernetes_documents()) == []


def test_the_schemas_cover_every_document_and_the_newest_kubernetes():
    """Every kind here has a schema (kubernetes-validate raises, not passes, on a kind it lacks), and the
    versions checked run up to the newest the installed kubernetes-validate ships."""
    import kubernetes_validate
    from kubernetes_validate.utils import major_minor

    versions = _kubernetes_versions()
    assert versions[0] == OLDEST_KUBERNETES and versions[-1] == major_minor(kubernetes_validate.latest_version())
    docs = kubernetes_documents()
    assert {doc["kind"] for doc in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                             "PodDisruptionBudget", "ConfigMap", "Namespace"}
    for doc in docs:
        assert kubernetes_validate.validate(doc, versions[-1], strict=True) == versions[-1]


def _set(path: tuple[Any, ...], value: Any) -> Any:
    """A break: the value at ``path`` (kind, name, keys...) set (``...``: removed)."""
    def mutate(docs: Docs) -> None:
        parent = _named(docs, path[0], path[1])
        for key in path[2:-1]:
            parent = parent[key]
        if value is ...:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return mutate


def _env_set(deployment: str, name: str, entry: dict[str, Any] | None) -> Any:
    """A break: the container's variable ``name`` replaced by ``entry`` (None: removed)."""
    def mutate(docs: Docs) -> None:
        container = _containers(_named(docs, "Deployment", deployment))[0]
        container["env"] = [env for env in container["env"] if env["name"] != name] + ([entry] if entry else [])
    return mutate


def _arg(deployment: str, old: str, new: str) -> Any:
    def mutate(docs: Docs) -> None:
        container = _containers(_named(docs, "Deployment", deployment))[0]
        container["args"] = [new if arg == old else arg for arg in container["args"]]
    return mutate


FRONT, RUNNER = "ingrain-bento", "ingrain-runner"
CONTAINER = ("spec", "template", "spec", "containers", 0)
BREAKS = {
    "unknown field": ("schema_problems", _set(("Deployment", RUNNER, *CONTAINER, "readinesProbe"), {})),
    "wrong type": ("schema_problems", _set(("Service", RUNNER, "spec", "ports", 0, "port"), "3000")),
    "other namespace": ("namespace_problems", _set(("Service", RUNNER, "metadata", "namespace"), "default")),
    "bentoml serve": ("bentoml_cli_problems", _set(("Deployment", RUNNER, *CONTAINER, "args"), ["serve"])),
    "misspelled option": ("bentoml_cli_problems", _arg(RUNNER, "--service-name", "--service")),
    "no such service": ("bentoml_cli_problems", _arg(RUNNER, "ingrain-runner", "ingrain-runners")),
    "port not declared": ("bentoml_cli_problems", _arg(FRONT, "8687", "8688")),
    "runner map env": ("runner_address_problems", _env_set(FRONT, "BENTOML_RUNNER_MAP", {
        "name": "BENTOML_RUNNER_MAP", "value": '{"ingrain-runner": "http://ingrain-runner:3000"}'})),
    "runner host": ("runner_address_problems", _arg(FRONT, "ingrain-runner=http://ingrain-runner:3000",
                                                    "ingrain-runner=http://runner:3000")),
    "runner port": ("runner_address_problems", _arg(FRONT, "ingrain-runner=http://ingrain-runner:3000",
                                                    "ingrain-runner=http://ingrain-runner:8687")),
    "runner listens elsewhere": ("runner_address_problems", _arg(RUNNER, "3000", "3001")),
    "readiness path": ("probe_problems", _set(("Deployment", RUNNER, *CONTAINER, "readinessProbe", "httpGet", "path"),
                                              "/livez")),
    "liveness port": ("probe_problems", _set(("Deployment", FRONT, *CONTAINER, "livenessProbe", "httpGet", "port"),
                                             9999)),
    "no readiness": ("probe_problems", _set(("Deployment", FRONT, *CONTAINER, "readinessProbe"), ...)),
    "no gpu": ("gpu_problems", _set(("Deployment", RUNNER, *CONTAINER, "resources", "requests", "nvidia.com/gpu"),
                                    ...)),
    "two runners per gpu": ("gpu_problems", _env_set(RUNNER, "INGRAIN_RUNNERS", {"name": "INGRAIN_RUNNERS",
                                                                                 "value": "2"})),
    "one runner replica": ("gpu_problems", _set(("Deployment", RUNNER, "spec", "replicas"), 1)),
    "replica id": ("gpu_problems", _env_set(RUNNER, "INGRAIN_REPLICA_ID", None)),
    "unknown setting": ("env_name_problems", _env_set(RUNNER, "INGRAIN_SHARED_STOR", {
        "name": "INGRAIN_SHARED_STOR", "value": "s3://bucket/prefix"})),
    "aws region": ("env_name_problems", _env_set(RUNNER, "AWS_REGION", {"name": "AWS_REGION", "value": "eu-west-3"})),
    "plain api key": ("env_name_problems", _env_set(FRONT, "INGRAIN_API_KEY", {"name": "INGRAIN_API_KEY",
                                                                              "value": "key"})),
    "bad value": ("env_value_problems", _env_set(RUNNER, "MAX_BATCH_SIZE", {"name": "MAX_BATCH_SIZE", "value": "0"})),
    "bad shared store": ("env_value_problems", _set(("ConfigMap", "ingrain-shared-store", "data",
                                                     "INGRAIN_SHARED_STORE"), "https://bucket/prefix")),
    "front holds models": ("env_value_problems", _env_set(FRONT, "INGRAIN_ENGINE_PROCESS", None)),
    "secret name": ("secret_problems", _env_set(RUNNER, "INGRAIN_RUNNER_TOKEN", {
        "name": "INGRAIN_RUNNER_TOKEN", "valueFrom": {"secretKeyRef": {"name": "runner-token",
                                                                       "key": "INGRAIN_RUNNER_TOKEN"}}})),
    "secret key": ("secret_problems", _env_set(RUNNER, "AWS_DEFAULT_REGION", {
        "name": "AWS_DEFAULT_REGION", "valueFrom": {"secretKeyRef": {"name": "ingrain-shared-store",
                                                                     "key": "AWS_REGION"}}})),
    "no token": ("secret_problems", _env_set(FRONT, "INGRAIN_RUNNER_TOKEN", None)),
    "no s3 secret": ("secret_problems", _env_set(RUNNER, "AWS_SECRET_ACCESS_KEY", None)),
    "configmap key": ("configmap_problems", _set(("ConfigMap", "ingrain-shared-store", "data", "INGRAIN_SYNC_S"),
                                                 ...)),
    "service selects both": ("selector_problems", _set(("Service", FRONT, "spec", "selector"),
                                                       {"app.kubernetes.io/name": "ingrain-bento"})),
    "target port": ("selector_problems", _set(("Service", RUNNER, "spec", "ports", 0, "targetPort"), "metrics")),
    "hpa target": ("autoscaling_problems", _set(("HorizontalPodAutoscaler", FRONT, "spec", "scaleTargetRef", "name"),
                                                "ingrain-front")),
    "hpa and replicas": ("autoscaling_problems", _set(("Deployment", FRONT, "spec", "replicas"), 2)),
    "hpa without requests": ("autoscaling_problems", _set(("Deployment", FRONT, *CONTAINER, "resources",
                                                           "requests", "cpu"), ...)),
    "pdb blocks drains": ("autoscaling_problems", _set(("PodDisruptionBudget", RUNNER, "spec", "maxUnavailable"), 0)),
    "pdb selects nothing": ("autoscaling_problems", _set(("PodDisruptionBudget", FRONT, "spec", "selector",
                                                          "matchLabels", "app.kubernetes.io/component"), "frontend")),
    "recreate": ("autoscaling_problems", _set(("Deployment", RUNNER, "spec", "strategy"), {"type": "Recreate"})),
    "two images": ("image_problems", _set(("Deployment", RUNNER, *CONTAINER, "image"), "ingrain-bento:other")),
}


@pytest.mark.parametrize("name", BREAKS)
def test_each_check_names_a_break(name):
    check, mutate = BREAKS[name]
    docs = copy.deepcopy(kubernetes_documents())
    mutate(docs)
    assert CHECKS[check](docs), f"{check} passed manifests with a break: {name}"


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
def test_kustomize_renders_the_same_objects():
    """`kubectl kustomize` (offline) renders exactly the objects of the files, the image rewritten."""
    rendered = subprocess.run(["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    key = lambda doc: (doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace"))  # noqa: E731
    assert sorted(map(key, docs)) == sorted(map(key, kubernetes_documents()))
    images = yaml.safe_load(KUSTOMIZATION.read_text())["images"][0]
    assert {c["image"] for d in _of_kind(docs, "Deployment") for c in _containers(d)} \
        == {f"{images['newName']}:{images['newTag']}"}
