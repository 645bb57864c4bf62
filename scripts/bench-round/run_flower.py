#!/usr/bin/env python3
"""The Flower baseline of `scripts/bench.sh round`: one run of Flower's deployment engine.

Starts `flower-superlink --insecure` and C `flower-supernode --insecure` processes on
loopback (free ports), submits the app in flower_app/ with `flwr run` (FedAvg over numpy
arrays of the fedward bench's tensor layout, a ClientApp that returns the arrays plus a
constant), waits for R rounds and stops everything it started. Each round is timed by the
ServerApp (configure_train, the offer, to aggregate_train done). CPU seconds and memory of
the two sides are sampled from /proc every 0.2 s over each process tree (the SuperLink
with the ServerApp process it spawns; each SuperNode with its ClientApp processes).

Run with the venv's python (scripts/bench.sh does):
  run_flower.py --layout L.json --sites C --rounds R --out F.json --work DIR
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")
PAGE_MIB = 1.0 / 1024.0  # VmRSS is in KiB


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_table():
    """pid -> (ppid, cpu seconds incl. reaped children, rss MiB)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            rest = stat.rsplit(")", 1)[1].split()
            ppid = int(rest[1])
            cpu = sum(int(x) for x in rest[11:15]) / TICK
            rss = int(rest[21]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        except (OSError, IndexError, ValueError):
            continue
        table[int(name)] = (ppid, cpu, rss)
    return table


def tree(table, root):
    children = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in table:
            out.append(p)
            todo.extend(children.get(p, []))
    return out


class Sampler(threading.Thread):
    """Samples (time, server cpu, server rss, clients cpu, max client rss) every 0.2 s."""

    def __init__(self, server_pid, client_pids):
        super().__init__(daemon=True)
        self.server_pid, self.client_pids = server_pid, client_pids
        self.samples = []
        self.stop = threading.Event()

    def sample(self):
        table = proc_table()
        s = tree(table, self.server_pid)
        server_cpu = sum(table[p][1] for p in s)
        server_rss = sum(table[p][2] for p in s)
        clients_cpu, client_rss = 0.0, 0.0
        for c in self.client_pids:
            t = tree(table, c)
            clients_cpu += sum(table[p][1] for p in t)
            client_rss = max(client_rss, sum(table[p][2] for p in t))
        self.samples.append((time.time(), server_cpu, server_rss, clients_cpu, client_rss))

    def run(self):
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.2)

    def at(self, t, i):
        """Column i, interpolated at time t."""
        prev = self.samples[0]
        for s in self.samples:
            if s[0] >= t:
                if s[0] == prev[0]:
                    return s[i]
                w = (t - prev[0]) / (s[0] - prev[0])
                return prev[i] + w * (s[i] - prev[i])
            prev = s
        return self.samples[-1][i]

    def peak(self, t0, t1, i):
        inside = [s[i] for s in self.samples if t0 <= s[0] <= t1]
        return max(inside) if inside else self.at(t1, i)


def wait_for_port(port, proc, log, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"flower: the SuperLink stopped; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"flower: the SuperLink did not listen in {timeout} s; see {log}")


def start(cmd, log, env):
    # A session of its own, so stopping it stops what it spawned (and nothing else).
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(p):
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", required=True, help="JSON list of {name, shape} (written by the fedward run)")
    ap.add_argument("--sites", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True, help="scratch directory (logs, FLWR_HOME)")
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args()

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    env = dict(os.environ, FLWR_HOME=str(work / "flwr-home"), PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    # Flower 1.42 serves its Fleet, Control and Runtime APIs over HTTP on one port.
    port = free_port()
    (work / "flwr-home").mkdir(exist_ok=True)
    (work / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    timing = work / "timing.jsonl"
    timing.unlink(missing_ok=True)
    layout = json.loads(Path(a.layout).read_text())
    params = sum(int(__import__("math").prod(t["shape"])) for t in layout)

    procs = []
    logs = []
    try:
        log = open(work / "superlink.log", "w")
        logs.append(log)
        superlink = start(
            [
                str(bindir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                "--port", str(port),
            ],
            log, env,
        )
        procs.append(superlink)
        wait_for_port(port, superlink, work / "superlink.log")
        supernodes = []
        for i in range(a.sites):
            log = open(work / f"supernode-{i}.log", "w")
            logs.append(log)
            p = start(
                [
                    str(bindir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                    "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={a.sites}",
                ],
                log, env,
            )
            procs.append(p)
            supernodes.append(p)
        sampler = Sampler(superlink.pid, [p.pid for p in supernodes])
        sampler.start()
        run_config = f"layout='{Path(a.layout).resolve()}' num-rounds={a.rounds} num-sites={a.sites} timing-file='{timing}'"
        log = open(work / "flwr-run.log", "w")
        logs.append(log)
        subprocess.run(
            [str(bindir / "flwr"), "run", str(HERE / "flower_app"), "bench", "--run-config", run_config],
            stdout=log, stderr=subprocess.STDOUT, env=env, check=True, timeout=120,
        )
        deadline = time.time() + a.timeout
        while True:
            events = [json.loads(l) for l in timing.read_text().splitlines()] if timing.exists() else []
            if sum(e["event"] == "aggregated" for e in events) >= a.rounds:
                break
            if time.time() > deadline:
                sys.exit(f"flower: {a.rounds} rounds did not finish in {a.timeout} s; see {work}")
            if superlink.poll() is not None:
                sys.exit(f"flower: the SuperLink stopped; see {work / 'superlink.log'}")
            time.sleep(0.2)
        sampler.sample()
        sampler.stop.set()
    finally:
        for p in reversed(procs):
            stop(p)
        for log in logs:
            log.close()

    offers = {e["round"]: e["t"] for e in events if e["event"] == "offer"}
    rounds = []
    for e in events:
        if e["event"] != "aggregated":
            continue
        r, t0, t1 = e["round"], offers[e["round"]], e["t"]
        rounds.append({
            "round": r,
            "secs": t1 - t0,
            "server_cpu_secs": sampler.at(t1, 1) - sampler.at(t0, 1),
            "server_peak_rss_mib": sampler.peak(t0, t1, 2),
            "clients_cpu_secs": sampler.at(t1, 3) - sampler.at(t0, 3),
            "client_peak_rss_mib": sampler.peak(t0, t1, 4),
        })
    out = {"system": "flower", "flwr": "1.42.0", "params": params, "tensors": len(layout), "sites": a.sites, "rounds": rounds}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"flower: {params} parameters in {len(layout)} tensors, {a.sites} sites, {len(rounds)} rounds")
    print("round  secs     server-cpu-s server-rss-MiB clients-cpu-s client-rss-MiB (sampled, process trees)")
    for r in rounds:
        print(f"{r['round']:>5} {r['secs']:>8.3f} {r['server_cpu_secs']:>12.2f} {r['server_peak_rss_mib']:>14.0f} "
              f"{r['clients_cpu_secs']:>13.2f} {r['client_peak_rss_mib']:>14.0f}")


if __name__ == "__main__":
    main()
