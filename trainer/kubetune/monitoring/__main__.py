"""`python -m kubetune.monitoring [DIR]`: write the dashboard JSON and the rules file (charts/kubetune/files)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kubetune.monitoring import dashboard, rules

DASHBOARD_FILE = "grafana-dashboard.json"
RULES_FILE = "prometheus-rules.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kubetune.monitoring", description=__doc__)
    parser.add_argument("dir", nargs="?", default="charts/kubetune/files", type=Path)
    parser.add_argument("--stall-for", default=rules.STALL_FOR, help="KubetuneTrainingStalled window (default "
                        f"{rules.STALL_FOR})")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    (args.dir / DASHBOARD_FILE).write_text(dashboard.render())
    (args.dir / RULES_FILE).write_text(rules.render(args.stall_for))
    print(f"wrote {args.dir / DASHBOARD_FILE} and {args.dir / RULES_FILE}")


if __name__ == "__main__":
    main()
