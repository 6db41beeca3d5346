"""The Grafana dashboard: every query parses and only uses metrics and labels zeta exposes.

A small PromQL parser (enough of the grammar for dashboards: selectors, ranges, functions,
aggregations with by/without, binary operators with on/ignoring/group_*) extracts each query's
series selectors and grouping labels; they are checked against zeta's exposition over a fake
scheduler with every family populated. ``test_prometheus.py`` also runs every query against a
real Prometheus.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zeta.telemetry import ZetaCollector

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "zeta.json"

#: Values for Grafana's variables, as Grafana would interpolate them.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$model": ".*",
    "$kind": ".*",
}

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile",
}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
BINARY = {"+", "-", "*", "/", "%", "^", "==", "!=", "<=", ">=", "<", ">", "and", "or", "unless"}
TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0x[0-9a-fA-F]+|[Ii]nf|NaN)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
    | (?P<op>==|!=|<=|>=|=~|!~|[-+*/%^<>=(){}\[\],:])
    )""",
    re.VERBOSE,
)


class PromQLError(ValueError):
    pass


@dataclass
class Selector:
    metric: str | None
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Parsed:
    selectors: list[Selector] = field(default_factory=list)
    #: (grouping labels, selectors inside the aggregation or binary operation they apply to)
    groupings: list[tuple[list[str], list[Selector]]] = field(default_factory=list)


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise PromQLError(f"cannot tokenize at {expr[pos:]!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class Parser:
    def __init__(self, expr: str) -> None:
        self.tokens = tokenize(expr)
        self.i = 0
        self.result = Parsed()

    def peek(self, offset: int = 0) -> tuple[str, str] | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value) or (kind and tok[0] != kind):
            raise PromQLError(f"expected {value or kind}, got {tok}")
        self.i += 1
        return tok[1]

    def at(self, value: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[1] == value and tok[0] in ("op", "ident")

    def parse(self) -> Parsed:
        self.expr()
        if self.peek() is not None:
            raise PromQLError(f"trailing input at {self.peek()}")
        return self.result

    def label_list(self) -> list[str]:
        self.take("(")
        labels = []
        while not self.at(")"):
            labels.append(self.take(kind="ident"))
            if not self.at(")"):
                self.take(",")
        self.take(")")
        return labels

    def expr(self) -> None:
        start = len(self.result.selectors)
        self.unary()
        while (tok := self.peek()) is not None and tok[1] in BINARY:
            self.i += 1
            if self.at("bool"):
                self.i += 1
            groups: list[str] = []
            if self.at("on") or self.at("ignoring"):
                on = self.take() == "on"
                labels = self.label_list()
                if on:
                    groups += labels
                if self.at("group_left") or self.at("group_right"):
                    self.i += 1
                    if self.at("("):
                        groups += self.label_list()
            self.unary()
            if groups:
                self.result.groupings.append((groups, self.result.selectors[start:]))

    def unary(self) -> None:
        if self.at("-") or self.at("+"):
            self.i += 1
        self.primary()
        self.postfix()

    def postfix(self) -> None:
        if self.at("["):
            self.take("[")
            self.take(kind="duration")
            if self.at(":"):
                self.take(":")
                if not self.at("]"):
                    self.take(kind="duration")
            self.take("]")
        if self.at("offset"):
            self.take("offset")
            if self.at("-"):
                self.i += 1
            self.take(kind="duration")

    def primary(self) -> None:
        tok = self.peek()
        if tok is None:
            raise PromQLError("unexpected end of expression")
        kind, value = tok
        if kind in ("number", "string"):
            self.i += 1
        elif value == "(":
            self.take("(")
            self.expr()
            self.take(")")
        elif value == "{":
            self.result.selectors.append(Selector(None, self.matchers()))
        elif kind == "ident" and value in AGGREGATIONS:
            self.aggregation()
        elif kind == "ident" and self.peek(1) == ("op", "("):
            self.i += 1
            self.args()
        elif kind == "ident" and value not in KEYWORDS:
            self.i += 1
            matchers = self.matchers() if self.at("{") else []
            self.result.selectors.append(Selector(value, matchers))
        else:
            raise PromQLError(f"unexpected {tok}")

    def args(self) -> None:
        self.take("(")
        while not self.at(")"):
            self.expr()
            if not self.at(")"):
                self.take(",")
        self.take(")")

    def aggregation(self) -> None:
        self.take(kind="ident")
        start = len(self.result.selectors)
        labels: list[str] = []
        if self.at("by") or self.at("without"):
            by = self.take() == "by"
            grouping = self.label_list()
            labels = grouping if by else []
        self.args()
        if self.at("by") or self.at("without"):
            by = self.take() == "by"
            grouping = self.label_list()
            labels = grouping if by else []
        if labels:
            self.result.groupings.append((labels, self.result.selectors[start:]))

    def matchers(self) -> list[tuple[str, str, str]]:
        self.take("{")
        out = []
        while not self.at("}"):
            label = self.take(kind="ident")
            op = self.take()
            if op not in ("=", "!=", "=~", "!~"):
                raise PromQLError(f"bad matcher operator {op!r}")
            out.append((label, op, self.take(kind="string")[1:-1]))
            if not self.at("}"):
                self.take(",")
        self.take("}")
        return out


def interpolate(expr: str) -> str:
    for var in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_VARS[var])
    return expr


def parse(expr: str) -> Parsed:
    return Parser(interpolate(expr)).parse()


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def exposed_labels(populated_scheduler: Any, registry: Any) -> dict[str, set[str]]:
    """Sample name -> label names, from zeta's exposition."""
    registry.register(ZetaCollector(populated_scheduler))
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def test_parser_accepts_promql_and_rejects_nonsense() -> None:
    p = parse(
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="1", y=~"$model"}[5m]))) '
        '/ on (x) group_left (y) b offset 5m + -count without (z) ({__name__=~"c.*"}[1h:1m])'
    )
    assert [s.metric for s in p.selectors] == ["a_bucket", "b", None]
    assert p.selectors[0].matchers == [("x", "=", "1"), ("y", "=~", ".*")]
    assert [g for g, _ in p.groupings] == [["le"], ["x", "y"]]
    for bad in ("sum(rate(x[5m])", "x{a=}", "rate(x[5q])", "x +", "sum by (le x)"):
        with pytest.raises(PromQLError):
            parse(bad)


def test_dashboard_is_ready_to_provision() -> None:
    dash = dashboard()
    assert dash["uid"] == "zeta-overview" and dash["title"]
    assert dash["id"] is None  # Grafana assigns ids; a fixed one breaks provisioning
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_what_an_operator_watches() -> None:
    text = " ".join(dashboard_exprs())
    for needed in (
        "zeta_scheduler_requests_total",  # request rate and outcomes
        "histogram_quantile(0.99, sum by (le, model, kind) (rate("
        "zeta_scheduler_request_duration_seconds_bucket",  # latency quantiles per model and kind
        "zeta_actor_queued_requests",  # queue depth
        "zeta_actor_utilisation_ratio",  # utilisation
        "zeta_gpu_utilisation_ratio",
        "zeta_scheduler_spills_total",  # spills
        "zeta_supervisor_restarts_total",  # restarts
    ):
        assert needed in text, needed


def test_every_metric_and_label_the_dashboard_uses_is_exposed(
    populated_scheduler: Any, metrics_registry: Any
) -> None:
    exposed = exposed_labels(populated_scheduler, metrics_registry)
    # Labels Prometheus adds to every scraped series.
    target_labels = {"job", "instance"}
    used: set[str] = set()
    for expr in dashboard_exprs():
        parsed = parse(expr)
        assert parsed.selectors, expr
        for sel in parsed.selectors:
            assert sel.metric is not None and sel.metric.startswith("zeta_"), expr
            used.add(sel.metric)
            assert sel.metric in exposed, f"{sel.metric} is not exposed (in {expr})"
            for label, _, _ in sel.matchers:
                assert label in exposed[sel.metric] | target_labels, (sel.metric, label)
        for labels, scope in parsed.groupings:
            available = set().union(*(exposed[s.metric] for s in scope if s.metric))
            for label in labels:
                assert label in available | target_labels, (label, expr)
    # Variables: label_values(metric, label).
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
        assert m, var["query"]
        assert m.group(2) in exposed[m.group(1)]
    assert len(used) >= 15  # the dashboard really queries the families, not one or two
