#!/usr/bin/env bash
# Admin: create the consortium CA and the coordinator's certificate.
#   deploy/pki/new-consortium.sh DIR SERVER_NAME [SERVER_IP]
set -euo pipefail
dir=${1:?usage: new-consortium.sh DIR SERVER_NAME [SERVER_IP]}; name=${2:?server name}; ip=${3:-}
args=(pki init --dir "$dir" --server-name "$name")
[ -n "$ip" ] && args+=(--server-ip "$ip")
fedward-coordinator "${args[@]}"
