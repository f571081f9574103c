"""cluster/grafana/poolserve.json parses, and every expression names only metrics that
app/metrics.py declares (so a renamed metric cannot leave a silently empty panel)."""

from __future__ import annotations

import json
import re
from typing import Any

from app import metrics
from tests.conftest import ROOT

DASHBOARD = ROOT / "cluster" / "grafana" / "poolserve.json"
PROMQL_WORDS = {
    # aggregations and keywords
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    # functions
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "histogram_quantile",
    "abs",
    "clamp_min",
    "clamp_max",
    "sum_over_time",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "label_replace",
    "vector",
    "scalar",
    "time",
    "changes",
    "resets",
}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append(target["expr"])
    return found


def metric_tokens(expr: str) -> set[str]:
    """Identifiers in metric position: strings, label matchers, by(...) lists, ranges and
    Grafana variables removed first."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\$\w+", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return words - PROMQL_WORDS


def test_dashboard_parses_and_names_only_declared_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "poolserve" and dashboard["panels"]
    declared = metrics.metric_names()
    exprs = expressions(dashboard)
    assert exprs
    used: set[str] = set()
    for expr in exprs:
        tokens = metric_tokens(expr)
        assert tokens, f"no metric in {expr!r}"
        unknown = tokens - declared
        assert not unknown, f"{expr!r} names metrics app/metrics.py does not declare: {unknown}"
        used |= tokens
    families = {name.removesuffix("_total").removesuffix("_bucket") for name in used}
    exported = {c.name for c in metrics.REGISTRY.collect()}
    assert exported <= families, f"metrics without a panel: {exported - families}"


def test_panels_have_unique_ids_and_refids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_request_metric_panels_never_add_up_scraped_replicas() -> None:
    """Every ingress replica answers the whole service's counts: a query that sums over
    instances would count them once per replica scraped as a target of its own."""
    dashboard = json.loads(DASHBOARD.read_text())
    shared = set(metrics.FAMILIES) | {metrics.SOURCES}
    for expr in expressions(dashboard):
        names = {n.removesuffix("_total").removesuffix("_bucket") for n in metric_tokens(expr)}
        if names & shared:
            assert re.search(r"sum by \([^)]*\binstance\b[^)]*\)", expr), expr
            assert expr.startswith(
                ("max", "histogram_quantile(0.5, max", "histogram_quantile(0.99, max")
            ), expr
