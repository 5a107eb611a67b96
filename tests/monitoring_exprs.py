"""The PromQL of the shipped dashboard and rules files, parsed (promql-parser) for the monitoring tests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import promql_parser
import yaml

from kubetune import contract

FILES = Path(__file__).resolve().parent.parent / "charts" / "kubetune" / "files"
DASHBOARD = FILES / "grafana-dashboard.json"
RULES = FILES / "prometheus-rules.yaml"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
OPERATOR_METRICS = {v for k, v in vars(contract).items() if k.startswith("METRIC_OP_")}
TRAINER_METRICS = {v for k, v in vars(contract).items() if k.startswith("METRIC_") and not k.startswith("METRIC_OP_")}
TRAINER_METRICS |= {m + s for m in (contract.METRIC_STEP_SECONDS, contract.METRIC_CHECKPOINT_SECONDS)
                    for s in HISTOGRAM_SUFFIXES}
_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def dashboard_expressions(path: Path = DASHBOARD) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values' selector)."""
    model = json.loads(path.read_text())
    for panel in model["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in model["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"])
            assert match, f"variable {variable['name']}: unexpected query {variable['query']}"
            yield f"variable {variable['name']}", match.group(1)


def rule_expressions(path: Path = RULES) -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def metric_names(expr: str) -> set[str]:
    grafana_free = expr.replace("$__rate_interval", "1m")
    return {s.name for s in selectors(grafana_free) if s.name}


def for_job(selector: promql_parser.VectorSelector, job: str, namespace: str) -> str:
    """The selector alone (no offset), narrowed to one FineTuneJob when it reads a trainer series."""
    matchers = {m.name: f'{m.name}{_OPS[str(m.op)]}"{m.value}"' for m in selector.matchers.matchers}
    if selector.name in TRAINER_METRICS:
        matchers["job"], matchers["namespace"] = f'job="{job}"', f'namespace="{namespace}"'
    return f"{selector.name}{{{', '.join(matchers.values())}}}" if matchers else str(selector.name)
