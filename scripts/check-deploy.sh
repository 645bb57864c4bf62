#!/usr/bin/env bash
# Checks that the deployment files work as shipped, offline (about 15 s once built):
#   1. systemd: the units' hardening (ProtectSystem=strict, NoNewPrivileges, a dedicated
#      user, StateDirectory = the example config's state_dir), SIGTERM with a stop timeout
#      that leaves the drain time, and `systemd-analyze verify` of each unit with its
#      ExecStart pointing at the built binaries (warnings count as failures).
#   2. compose: deploy/docker/prepare.sh into a scratch copy, `docker compose config` where
#      a compose is installed, then deploy/check_deploy.py: every mount's source made by
#      prepare.sh, every path the rendered configs name inside a mount or the image, the
#      published port and every health check's port equal to what the configs bind.
#      Then the configs themselves, with container paths replaced by the prepared files:
#      `check-config` for each, and live on this host: the coordinator, site-a's agent
#      and site-a's triage service started from them, each compose health check command
#      run as written until it passes (the agent admitted by the coordinator with the
#      prepared certificates), then SIGTERM to each, which must exit 0.
#   4. Prometheus: promtool checks the alert rules and the scrape config, where installed.
#   3. k8s: deploy/check_deploy.py: a schema subset of every object (unknown fields,
#      apiVersion, names, selectors, volumes, mounts, probes), and agreement with
#      deploy/config/: ports, loopback binds probed with exec from inside the pod, keys
#      from Secrets copied 0600, the state directory on the persistent volume.
# Not exercised here (no container daemon, no cluster): building the image, running the
# containers, `kubectl apply` against an API server. See README, "Deploying".
#
#   scripts/check-deploy.sh          (FEDWARD_BIN_DIR=DIR to use built binaries as they are)
#
# Needs python3 with PyYAML (Debian: python3-yaml), systemd-analyze (Debian: systemd), the
# base model (scripts/fetch-models.sh). The live run binds free ports in place of the
# configs' own (7080, 7443, 8479, 8480), in the configs and the health checks alike.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
started=$SECONDS

fail() { echo "check-deploy: $*" >&2; exit 1; }
python3 -c 'import yaml, tomllib' 2>/dev/null || fail "needs python3 (3.11+) with PyYAML: apt-get install python3-yaml"
command -v systemd-analyze >/dev/null || fail "needs systemd-analyze: apt-get install systemd"
[ -f models-data/all-MiniLM-L6-v2/model.safetensors ] || fail "needs the base model the image carries: scripts/fetch-models.sh"

if [ -z "${FEDWARD_BIN_DIR:-}" ]; then
  cargo build --locked --bin fedward-agent --bin fedward-coordinator
  FEDWARD_BIN_DIR="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
fi
export FEDWARD_BIN_DIR
FEDWARD_BIN_DIR=$(cd "$FEDWARD_BIN_DIR" && pwd)

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# 1. systemd -----------------------------------------------------------------------------
python3 deploy/check_deploy.py systemd
mkdir -p "$tmp/bin" "$tmp/units"
ln -s "$FEDWARD_BIN_DIR/fedward-agent" "$FEDWARD_BIN_DIR/fedward-coordinator" "$tmp/bin/"
for unit in deploy/systemd/*.service; do
  # Only the binaries' directory changes: verify needs ExecStart's binaries to exist.
  sed "s#/usr/local/bin/#$tmp/bin/#g" "$unit" >"$tmp/units/$(basename "$unit")"
done
said=$(cd "$tmp/units" && systemd-analyze verify ./*.service 2>&1) || fail "systemd-analyze verify: $said"
[ -z "$said" ] || fail "systemd-analyze verify warns: $said"
echo "  ok: systemd-analyze verify passes the three units, without a warning"

# 2. compose -----------------------------------------------------------------------------
mirror=$tmp/clone
mkdir -p "$mirror/deploy/docker"
cp deploy/docker/compose.yaml "$mirror/deploy/docker/"
deploy/docker/prepare.sh --out "$mirror/deploy/docker/local" --no-models >/dev/null
if docker compose version >/dev/null 2>&1; then
  (cd "$mirror/deploy/docker" && docker compose config -q) || fail "docker compose config refuses compose.yaml"
  echo "compose schema:"; echo "  ok: docker compose config accepts compose.yaml"
elif command -v docker-compose >/dev/null; then
  (cd "$mirror/deploy/docker" && docker-compose config -q) || fail "docker-compose config refuses compose.yaml"
  echo "compose schema:"; echo "  ok: docker-compose config accepts compose.yaml"
else
  echo "compose schema: skipped (no docker compose or docker-compose here)"
fi
python3 deploy/check_deploy.py compose "$mirror" "$tmp/plan.json"

# The plan: name, binary, subcommand, host config, health check command, one per line.
python3 - "$tmp/plan.json" >"$tmp/plan.tsv" <<'PY'
import json, sys
for s in json.load(open(sys.argv[1])):
    print("\t".join([s["name"], s["binary"], s["sub"], s["config"], json.dumps(s["probe"]), str(s["port"]), str(s["config_port"])]))
PY
while IFS=$'\t' read -r name binary sub config probe _ _; do
  "$FEDWARD_BIN_DIR/$binary" check-config --config "$config" >/dev/null 2>"$tmp/$name.check" \
    || fail "$name: check-config of its rendered config: $(cat "$tmp/$name.check")"
done <"$tmp/plan.tsv"
echo "  ok: check-config accepts every rendered config (container paths replaced by the prepared files)"

# Runs a health check command as compose would, until it passes or `secs` run out.
probe_until() {
  local name=$1 probe=$2 secs=$3 pid=$4 end=$((SECONDS + $3))
  local -a argv
  mapfile -t argv < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "$probe")
  until timeout 5 "${argv[@]}" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || fail "$name exited before its health check passed: $(tail -n 5 "$tmp/$name.log")"
    [ $SECONDS -lt $end ] || fail "$name: its health check did not pass within $secs s: $(tail -n 5 "$tmp/$name.log")"
    sleep 0.5
  done
}
# The coordinator, site-a's agent and site-a's triage service (site-b stays out: with one
# site below the quorum no round starts, so nothing trains).
declare -A pid_of
for name in coordinator agent-site-a triage-site-a; do
  IFS=$'\t' read -r _ binary sub config probe port config_port < <(grep "^$name	" "$tmp/plan.tsv")
  "$FEDWARD_BIN_DIR/$binary" "$sub" --config "$config" >"$tmp/$name.log" 2>&1 &
  pid_of[$name]=$!
  pids+=($!)
  if [ "$name" = triage-site-a ]; then
    # Healthy only once a round's model is cached; before that /healthz must answer 503.
    probe_until "$name" "${probe/ 200 /^HTTP/}" 30 "${pid_of[$name]}"
    head=$(exec 3<>/dev/tcp/127.0.0.1/"$port" && printf 'GET /healthz HTTP/1.0\r\n\r\n' >&3 && cat <&3)
    [[ $head == *" 503 "*"no model yet"* ]] || fail "triage /healthz before any round: $head"
    echo "  ok: $name answers its health check's port; /healthz is 503 \"no model yet\" until a round's model arrives"
  else
    probe_until "$name" "$probe" 60 "${pid_of[$name]}"
    echo "  ok: $name passes its compose health check (the same command as its k8s probe; port $config_port as $port here)"
  fi
  if [ "$name" = agent-site-a ]; then
    end=$((SECONDS + 30))
    until (exec 3<>/dev/tcp/127.0.0.1/"$port" && printf 'GET /status HTTP/1.0\r\n\r\n' >&3 && cat <&3) | grep -qi '"waiting"'; do
      [ $SECONDS -lt $end ] || fail "agent-site-a was not admitted by the coordinator: $(tail -n 5 "$tmp/$name.log")"
      sleep 0.5
    done
    echo "  ok: agent-site-a is admitted by the coordinator with the prepared certificates, waiting for a round"
  fi
done
echo "sigterm:"
for name in triage-site-a agent-site-a coordinator; do
  pid=${pid_of[$name]}
  kill -TERM "$pid"
  end=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && fail "$name did not stop within 30 s of SIGTERM: $(tail -n 5 "$tmp/$name.log")"
  status=0
  wait "$pid" || status=$?
  [ "$status" = 0 ] || fail "$name exited $status on SIGTERM, not 0: $(tail -n 5 "$tmp/$name.log")"
  echo "  ok: $name stops on SIGTERM with exit 0"
done
pids=()

# 3. k8s ---------------------------------------------------------------------------------
python3 deploy/check_deploy.py k8s

# 4. Prometheus ---------------------------------------------------------------------------
# The alert rules parse and evaluate as PromQL; the scrape config is checked with its token
# file stood in (Debian: apt-get install prometheus, for promtool).
echo "prometheus:"
if command -v promtool >/dev/null; then
  promtool check rules deploy/prometheus/alerts.yml >/dev/null || fail "deploy/prometheus/alerts.yml: promtool check rules failed"
  mkdir -p "$tmp/prometheus"
  echo "fwt_stand_in" > "$tmp/prometheus/token"
  cp deploy/prometheus/alerts.yml "$tmp/prometheus/"
  sed "s|/etc/prometheus/fedward-token|$tmp/prometheus/token|; s|/etc/fedward/pki/ca.crt|$tmp/prometheus/token|" \
    deploy/prometheus/prometheus.yml > "$tmp/prometheus/prometheus.yml"
  promtool check config "$tmp/prometheus/prometheus.yml" >/dev/null || fail "deploy/prometheus/prometheus.yml: promtool check config failed"
  echo "  ok: alert rules and scrape config (promtool)"
else
  echo "  skipped: no promtool (apt-get install prometheus)"
fi

echo "check-deploy: all passed in $((SECONDS - started)) s"
