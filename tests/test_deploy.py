"""The Kubernetes and KEDA manifests under deploy/: they parse, carry what Kubernetes and KEDA
require, start telepipe with arguments its own parser accepts, and agree with each other and
with telepipe's defaults on every port."""

import shlex

import pytest
import yaml

from pipeline.config import Config
from pipeline.config_file import from_dict
from telepipe.cli import build_parser

from .conftest import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"


def documents(name):
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, (kind, name)
    return found[0]


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.fixture(scope="module")
def telepipe():
    return documents("telepipe.yaml")


def test_every_document_has_what_kubernetes_requires(telepipe):
    for name in ("telepipe.yaml", "scaledobject-external.yaml", "scaledobject-prometheus.yaml"):
        for doc in documents(name):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name
    sts = by_kind(telepipe, "StatefulSet")
    assert sts["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert by_kind(telepipe, "Service", "telepipe")["spec"]["clusterIP"] == "None"  # stable member names
    assert sts["spec"]["serviceName"] == "telepipe"


def test_the_daemon_starts_with_arguments_telepipe_accepts_and_the_ports_agree(telepipe):
    sts = by_kind(telepipe, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    argv = shlex.split(container["args"][0].replace('"${HOSTNAME##*-}"', "0"))
    assert argv[:2] == ["exec", "telepipe"]
    args = build_parser().parse_args(argv[2:])
    assert args.command == "run" and args.process_id == 0
    addresses = args.addresses.split(",")
    assert len(addresses) == sts["spec"]["replicas"]
    assert all(a.startswith(f"telepipe-{i}.telepipe:") for i, a in enumerate(addresses))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    defaults = Config()
    assert ports["otlp-grpc"] == port_of(args.otlp_grpc) == port_of(defaults.otlp.grpc_listen)
    assert ports["http"] == port_of(args.http) == port_of(defaults.http.listen)
    assert ports["keda"] == port_of(args.keda)
    assert {port_of(a) for a in addresses} == {ports["cluster"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == ports["http"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    services = {d["metadata"]["name"]: d for d in telepipe if d["kind"] == "Service"}
    assert services["telepipe-otlp"]["spec"]["ports"][0]["targetPort"] == ports["otlp-grpc"]
    assert services["telepipe-keda"]["spec"]["ports"][0]["targetPort"] == ports["keda"]
    assert services["telepipe-keda"]["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "telepipe-0"
    assert services["telepipe"]["spec"]["ports"][0]["port"] == ports["cluster"]


def test_volumes_give_each_pod_its_spool_and_all_pods_one_recovery_directory(telepipe):
    sts = by_kind(telepipe, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    argv = shlex.split(container["args"][0])
    data_dir = argv[argv.index("--data-dir") + 1]
    assert mounts["data"] == data_dir and mounts["recovery"] == f"{data_dir}/recovery"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    shared = by_kind(telepipe, "PersistentVolumeClaim", "telepipe-recovery")
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    config_path = argv[argv.index("--config") + 1]
    assert config_path.startswith(mounts["config"])
    toml = by_kind(telepipe, "ConfigMap", "telepipe")["data"]["telepipe.toml"]
    import tomllib

    from_dict(tomllib.loads(toml))  # the shipped config is valid


def test_scaled_objects_point_at_telepipes_signal(telepipe):
    external = by_kind(documents("scaledobject-external.yaml"), "ScaledObject")
    (trigger,) = external["spec"]["triggers"]
    assert trigger["type"] in ("external", "external-push") and trigger["metadata"]["service"]
    keda = by_kind(telepipe, "Service", "telepipe-keda")
    host, _, port = trigger["metadata"]["scalerAddress"].rpartition(":")
    assert host.split(".")[0] == keda["metadata"]["name"] and int(port) == keda["spec"]["ports"][0]["port"]
    prometheus = by_kind(documents("scaledobject-prometheus.yaml"), "ScaledObject")
    (trigger,) = prometheus["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "1"
    assert "telepipe_desired_replicas" in trigger["metadata"]["query"]
    for obj in (external, prometheus):
        assert obj["spec"]["scaleTargetRef"]["name"] and obj["spec"]["minReplicaCount"] >= 1
