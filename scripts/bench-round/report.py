#!/usr/bin/env python3
"""The table and ratio of `scripts/bench.sh round`: reads the JSON of each fedward run
(coordinator/benches/round.rs) and each Flower run (run_flower.py), in the order they ran,
and compares rounds 2..R (round 1 includes each side's start-up: connections, and in
fedward the first full download into an empty cache). With fedward runs of both
aggregations (plain and secure, interleaved), it prints the ratio secure/plain of round
time, bytes at the coordinator and CPU, overall and per interleaved pair.

  report.py --out round.json RUN.json...
"""

import argparse
import json
import statistics
from pathlib import Path


def later(run):
    rounds = [r for r in run["rounds"] if r["round"] >= 2]
    return rounds or run["rounds"]


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in a.runs]
    summary = {"runs": []}
    print()
    print("system   run  params      tensors sites  round s (2..R: median, each)        "
          "server cpu-s/round  server peak MiB  sites cpu-s/round  site peak MiB  server MB in/out")
    counts = {}
    for run in runs:
        sys_ = run["system"]
        if sys_ == "fedward" and run.get("aggregation") == "secure":
            sys_ = "secure"
        counts[sys_] = counts.get(sys_, 0) + 1
        rs = later(run)
        secs = [r["secs"] for r in rs]
        if sys_ != "flower":
            server_cpu = [r["coordinator_cpu_secs"] for r in rs]
            server_peak = max(r["coordinator_peak_rss_mib"] for r in rs)
            sites_cpu = [r["agents_cpu_secs"] for r in rs]
            site_peak = max(r["agent_peak_rss_mib"] for r in rs)
        else:
            server_cpu = [r["server_cpu_secs"] for r in rs]
            server_peak = max(r["server_peak_rss_mib"] for r in rs)
            sites_cpu = [r["clients_cpu_secs"] for r in rs]
            site_peak = max(r["client_peak_rss_mib"] for r in rs)
        row = {
            "system": sys_, "run": counts[sys_], "params": run["params"], "tensors": run["tensors"], "sites": run["sites"],
            "round_secs": secs, "median_round_secs": med(secs),
            "server_cpu_secs_per_round": med(server_cpu), "server_peak_rss_mib": server_peak,
            "sites_cpu_secs_per_round": med(sites_cpu), "site_peak_rss_mib": site_peak,
        }
        mb_in = mb_out = float("nan")
        if sys_ != "flower":
            mb_in = med([r.get("coordinator_bytes_in", float("nan")) / 1e6 for r in rs])
            mb_out = med([r.get("coordinator_bytes_out", float("nan")) / 1e6 for r in rs])
            row["coordinator_mb_in_per_round"] = mb_in
            row["coordinator_mb_out_per_round"] = mb_out
            row["site_cpu_secs_max_per_round"] = med([r.get("agent_cpu_secs_max", float("nan")) for r in rs])
            row["secure"] = run.get("secure")
            row["agent_non_training_secs_mean"] = med([r["agent_mean"]["non_training_secs"] for r in rs])
            row["agent_non_training_secs_max"] = max(r["agent_max_non_training_secs"] for r in rs)
        summary["runs"].append(row)
        each = " ".join(f"{s:.2f}" for s in secs)
        print(f"{sys_:<8} {counts[sys_]:>3}  {run['params']:>10}  {run['tensors']:>7} {run['sites']:>5}  "
              f"{med(secs):>8.3f} ({each}){'':<4} {med(server_cpu):>10.2f} {server_peak:>16.0f} "
              f"{med(sites_cpu):>18.2f} {site_peak:>14.0f}  {mb_in:>7.2f}/{mb_out:.2f}")
    fed = [s for r in summary["runs"] if r["system"] == "fedward" for s in r["round_secs"]]
    flo = [s for r in summary["runs"] if r["system"] == "flower" for s in r["round_secs"]]
    for r in summary["runs"]:
        if r["system"] != "flower":
            print(f"{r['system']} run {r['run']}: an agent's non-training time per round (rounds 2..R), "
                  f"median of the agents' mean {r['agent_non_training_secs_mean']:.3f} s, max {r['agent_non_training_secs_max']:.3f} s")
    summary["fedward_median_round_secs"] = med(fed)
    if flo:
        summary["flower_median_round_secs"] = med(flo)
        summary["ratio_fedward_over_flower"] = med(fed) / med(flo)
        pairs = [
            f["median_round_secs"] / w["median_round_secs"]
            for f, w in zip(
                [r for r in summary["runs"] if r["system"] == "fedward"],
                [r for r in summary["runs"] if r["system"] == "flower"],
            )
        ]
        summary["ratio_per_pair"] = pairs
        print(f"\nround time, rounds 2..R, median over all runs: fedward {med(fed):.3f} s, Flower {med(flo):.3f} s; "
              f"fedward/Flower = {med(fed) / med(flo):.4f}x (per interleaved pair: {', '.join(f'{p:.4f}' for p in pairs)})")
    else:
        print(f"\nround time, rounds 2..R, median over all runs: fedward {med(fed):.3f} s")
    plain = [r for r in summary["runs"] if r["system"] == "fedward"]
    secure = [r for r in summary["runs"] if r["system"] == "secure"]
    if plain and secure:
        measures = [
            ("round time", "median_round_secs"),
            ("bytes at the coordinator, in+out", None),
            ("coordinator CPU", "server_cpu_secs_per_round"),
            ("sites' CPU, all", "sites_cpu_secs_per_round"),
            ("busiest site's CPU", "site_cpu_secs_max_per_round"),
        ]

        def value(r, key):
            if key is None:
                return r["coordinator_mb_in_per_round"] + r["coordinator_mb_out_per_round"]
            return r[key]

        ratios = {}
        print("\nsecure / plain (rounds 2..R medians; per interleaved pair, then over all runs):")
        for label, key in measures:
            pairs = [value(s, key) / value(p, key) for p, s in zip(plain, secure)]
            overall = med([value(s, key) for s in secure]) / med([value(p, key) for p in plain])
            ratios[label] = {"per_pair": pairs, "overall": overall}
            print(f"  {label:<34} {overall:6.3f}x  (pairs: {', '.join(f'{x:.3f}' for x in pairs)})")
        summary["secure_over_plain"] = ratios
    Path(a.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
