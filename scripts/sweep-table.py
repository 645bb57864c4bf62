#!/usr/bin/env python3
"""One table from the reports of a seed sweep (deploy/demo.sh --seeds ...).

Reads each DIR/seed-S/report.json written by fedward-demo and prints a Markdown table
(federated against centralized and the best local-only model on the pooled test split,
and on the hand-written notes where the report has them), then a JSON summary to the path
given with --json. Standard library only.
"""
import argparse
import json
import pathlib
import sys


def figure(report, *keys):
    value = report
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) else None


def ratio(x):
    return "-" if x is None else f"{x:.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reports", nargs="+", type=pathlib.Path, help="report.json of each seed")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    rows = []
    for path in args.reports:
        report = json.loads(path.read_text())
        federated = figure(report, "final", "accuracy")
        centralized = figure(report, "centralized", "accuracy")
        local = [v.get("accuracy") for v in (report.get("local_only") or {}).values() if isinstance(v, dict)]
        local = [x for x in local if isinstance(x, (int, float))]
        rows.append({
            "seed": figure(report, "demo", "seed"),
            "federated": federated,
            "federated_macro_f1": figure(report, "final", "macro_f1"),
            "centralized": centralized,
            "best_local_only": max(local) if local else None,
            "gap_points": None if federated is None or centralized is None else 100 * (centralized - federated),
            "handwritten_federated": figure(report, "handwritten", "federated_accuracy"),
            "handwritten_centralized": figure(report, "centralized", "handwritten_accuracy"),
            "minutes": None if figure(report, "demo", "seconds") is None else figure(report, "demo", "seconds") / 60,
            "report": str(path),
        })

    print("| seed | federated | macro-F1 | centralized | fed - cen, points | best local-only | hand-written: federated | hand-written: centralized | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = "-" if r["gap_points"] is None else f"{-r['gap_points']:+.2f}"
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
        print(
            f"| {r['seed']} | {ratio(r['federated'])} | {ratio(r['federated_macro_f1'])} | {ratio(r['centralized'])} "
            f"| {gap} | {ratio(r['best_local_only'])} "
            f"| {ratio(r['handwritten_federated'])} | {ratio(r['handwritten_centralized'])} "
            f"| {minutes} |"
        )
    gaps = [r["gap_points"] for r in rows if r["gap_points"] is not None]
    if gaps:
        worst = max(gaps)
        print(f"\nworst gap to centralized: {worst:.2f} points over {len(gaps)} seeds; "
              f"within 1.0 point on every seed: {'yes' if worst <= 1.0 + 1e-9 else 'no'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
