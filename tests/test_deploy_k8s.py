"""deploy/k8s: valid against the Kubernetes schemas, and consistent with what the server,
the image and the tested nginx configuration need.

Schemas come from the kubernetes-validate package (shipped inside it: no network).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from replserver.settings import Settings

from . import dockerfile
from .dockerfile import ROOT

K8S = ROOT / "deploy" / "k8s"
NGINX_CONF = ROOT / "deploy" / "nginx" / "replserver.conf"
# The oldest and the newest Kubernetes versions whose schemas the package ships.
VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
MiB = 1024 * 1024

Doc = dict[str, Any]


def documents() -> list[tuple[Path, Doc]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def one(kind: str) -> Doc:
    found = [doc for path, doc in documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Doc = containers[0]
    return result


def env_of(spec: Doc) -> dict[str, Doc]:
    return {item["name"]: item for item in spec.get("env", [])}


def seconds(value: str) -> int:
    assert value.endswith("s") or value.isdigit(), value
    return int(value.rstrip("s"))


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    checked = []
    for path, doc in documents():
        if doc["kind"] == "Kustomization":
            continue  # a kustomize file, not an API object; checked below
        # strict: an unknown or misspelt field is an error, not silently dropped.
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {exc.message} at {list(exc.path)}")
        checked.append(doc["kind"])
    assert sorted(checked) == sorted(
        ["ConfigMap", "Deployment", "Ingress", "PodDisruptionBudget", "Service"]
    )


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = copy.deepcopy(one("Deployment"))
    container(broken)["securityContext"]["allowPrivilegeEscalaton"] = False  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    broken = copy.deepcopy(one("Deployment"))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = one("Kustomization")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_labels_and_names_connect() -> None:
    deployment, service = one("Deployment"), one("Service")
    pdb, ingress = one("PodDisruptionBudget"), one("Ingress")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for backend in backends:
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in port_names
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in {port["name"] for port in container(deployment)["ports"]}


def test_security_context_is_what_the_server_was_tested_with() -> None:
    """The same capabilities as the Dockerfile documents, which test_container.py runs the
    whole server under; nothing privileged, no SYS_ADMIN, no service-account token."""
    pod = one("Deployment")["spec"]["template"]["spec"]
    context = container(one("Deployment"))["securityContext"]
    caps, no_new_privs = dockerfile.documented_capabilities()
    assert set(context["capabilities"]["add"]) == caps
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["allowPrivilegeEscalation"] is (not no_new_privs)
    assert context["runAsUser"] == 0 and context["privileged"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert "SYS_ADMIN" not in caps
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    # Children write only below /tmp (their private directories): an emptyDir there, made
    # a real /tmp (1777) first; test_container.py runs the server in just this layout.
    mounts = {m["mountPath"] for m in container(one("Deployment"))["volumeMounts"]}
    assert "/tmp" in mounts
    (init,) = pod["initContainers"]
    assert init["command"] == ["chmod", "1777", "/tmp"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/tmp"}
    env = env_of(container(one("Deployment")))
    assert env["REPL_REQUIRE_ISOLATION"]["value"] == "1"
    assert env["REPL_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_probes_port_and_image() -> None:
    deployment = one("Deployment")
    main = container(deployment)
    port = main["ports"][0]
    assert str(port["containerPort"]) == dockerfile.env()["REPL_PORT"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = main[probe]["httpGet"]
        assert check["path"] == "/health" and check["port"] == port["name"], probe
    images = {c["image"] for c in deployment["spec"]["template"]["spec"]["initContainers"]}
    assert images == {main["image"]}
    assert not main["image"].endswith(":latest")
    resources = main["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]


def test_shutdown_fits_the_grace_period() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    main = container(one("Deployment"))
    grace_s = float(env_of(main)["REPL_SHUTDOWN_GRACE_S"]["value"])
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The server's own bound: the sessions' saves (at most REPL_TIMEOUT_S, 30 s by default:
    # replserver/snapshots/keeper.py), then 2 x REPL_SHUTDOWN_GRACE_S + 1 s (the Dockerfile).
    save_s = float(env_of(main).get("REPL_TIMEOUT_S", {}).get("value", 30))
    needed = float(pre_stop[1]) + save_s + 2 * grace_s + 1
    assert pod["terminationGracePeriodSeconds"] >= needed + 10, "keep a margin"


def test_snapshots_come_from_the_secret_store_and_key_together() -> None:
    env = env_of(container(one("Deployment")))
    refs = [
        env[name]["valueFrom"]["secretKeyRef"]
        for name in ("REPL_SNAPSHOT_STORE", "REPL_SNAPSHOT_KEY")
    ]
    assert {ref["name"] for ref in refs} == {"replserver"}
    assert [ref["key"] for ref in refs] == ["snapshot-store", "snapshot-key"]


def test_body_limit_agrees_everywhere() -> None:
    assert Settings.from_env({}).max_body_bytes == MiB
    env = env_of(container(one("Deployment")))
    assert int(env["REPL_MAX_BODY_BYTES"]["value"]) == MiB
    annotations = one("Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "1m"
    assert "client_max_body_size 1m;" in NGINX_CONF.read_text()


def test_ingress_hashes_the_session_id_like_the_tested_nginx_config() -> None:
    annotations = one("Ingress")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "upstream-hash-by"] == "$replserver_session"
    assert annotations[prefix + "service-upstream"] == "false"
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert seconds(annotations[prefix + "proxy-read-timeout"]) >= 330
    # The map defining $replserver_session: verbatim the one tests/test_deploy_nginx.py
    # runs in front of three replicas.
    snippet = one("ConfigMap")["data"]["http-snippet"]

    def map_block(text: str) -> list[str]:
        match = re.search(r"^\s*map \$uri \$replserver_session \{.*?^\s*\}", text, re.M | re.S)
        assert match, text
        return [line.strip() for line in match.group(0).splitlines()]

    assert map_block(snippet) == map_block(NGINX_CONF.read_text())
    assert "hash $replserver_session consistent;" in NGINX_CONF.read_text()
