"""Dashboards and alert rules query only metrics the code exports: they cannot drift apart."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
# Series that come from Prometheus itself or from Flower, not from our code.
EXTERNAL = {"up"}
PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "deriv", "histogram_quantile", "by", "le", "and", "or",
    "absent", "max", "min", "avg", "count", "without", "on", "ignoring", "bool", "offset",
    "clamp_min", "vector", "unless", "avg_over_time", "max_over_time", "min_over_time",
}  # fmt: skip


def exported() -> set[str]:
    """Every series name the API and worker can expose (counters with _total, histograms
    with _bucket/_sum/_count, the scrape-time gauges)."""
    import api.metrics
    import workers.metrics  # importing registers the worker's metrics

    # The scrape-time collectors (the GPU one is registered only where a GPU is visible).
    names: set[str] = set(api.metrics.StoreCollector.NAMES) | set(workers.metrics.GpuCollector.NAMES)
    for family in REGISTRY.collect():
        if not family.name.startswith("batchvision_"):
            continue
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        elif family.type == "info":
            names.add(family.name + "_info")
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name series (not functions, labels or keywords)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", expr))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"[0-9.e]+|m|s|h|d", w)}


def rule_exprs() -> list[str]:
    compose = yaml.safe_load((ROOT / "compose" / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in compose["groups"] for r in g["rules"]]
    k8s = yaml.safe_load((ROOT / "k8s" / "overlays" / "monitoring" / "prometheusrule.yaml").read_text())
    exprs += [r["expr"] for g in k8s["spec"]["groups"] for r in g["rules"]]
    return exprs


def dashboard_exprs() -> list[str]:
    dash = json.loads((ROOT / "compose" / "grafana" / "dashboards" / "batchvision.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_parser_finds_metric_names() -> None:
    expr = 'histogram_quantile(0.5, sum(rate(batchvision_batch_size_bucket{job="x"}[10m])) by (le)) < 4'
    assert metric_names(expr) == {"batchvision_batch_size_bucket"}


def test_every_queried_metric_is_exported() -> None:
    known = exported() | EXTERNAL
    exprs = rule_exprs() + dashboard_exprs()
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    flower = {n for n in used if n.startswith("flower_")}
    assert used - flower <= known, f"queried but never exported: {sorted(used - flower - known)}"
    # the alerts the monitoring issue asks for are all there
    alerts = yaml.safe_load((ROOT / "compose" / "prometheus" / "alerts.yml").read_text())
    names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    assert {"BatchvisionApiDown", "BatchvisionNoWorker", "BatchvisionQueueGrowing"} <= names
    assert {"BatchvisionHighErrorRate", "BatchvisionSmallBatches"} <= names


def test_dashboard_covers_the_operator_questions() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for needed in (
        "batchvision_images_classified_total",  # throughput and error rate
        "batchvision_queue_depth_images",
        "batchvision_batch_size_sum",  # batch fill (the mean)
        "batchvision_http_request_duration_seconds_bucket",  # latency percentiles
        "up",  # workers up
        "batchvision_queue_wait_seconds_bucket",  # how long images wait for a batch
        "batchvision_worker_parked_chunks",  # a key's URL flood held back
        "batchvision_gpu_utilization_ratio",  # GPU workers: busy and memory
        "batchvision_gpu_memory_used_bytes",
    ):
        assert needed in used, needed
