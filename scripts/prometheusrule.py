#!/usr/bin/env python3
"""Generate k8s/overlays/monitoring/prometheusrule.yaml from compose/prometheus/alerts.yml.

The alert rules have one source, the compose file; the Kubernetes PrometheusRule carries the
same groups as its ``spec``. After editing alerts.yml run::

    python scripts/prometheusrule.py            # rewrite the PrometheusRule
    python scripts/prometheusrule.py --check    # exit 1 if it is stale (tests/unit/test_alert_rules.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "compose" / "prometheus" / "alerts.yml"
TARGET = ROOT / "k8s" / "overlays" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from compose/prometheus/alerts.yml by scripts/prometheusrule.py: do not edit here.
# Edit alerts.yml, then run `python scripts/prometheusrule.py` (a test fails when this is stale).
# Your Prometheus' ruleSelector may need a label on this object, e.g. release:
# kube-prometheus-stack: add it in your own overlay (kustomize `labels:`), not here.
"""


def render(source: Path = SOURCE) -> str:
    rules = yaml.safe_load(source.read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "batchvision", "labels": {"app.kubernetes.io/name": "batchvision"}},
        "spec": rules,
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=1000, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if TARGET.read_text() != text:
            print(
                f"{TARGET.relative_to(ROOT)} is stale: run python scripts/prometheusrule.py", file=sys.stderr
            )
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
