#!/usr/bin/env bash
# Hospital IT: generate this site's key (stays here) and a signing request for the admin.
#   deploy/pki/site-request.sh SITE_ID DIR
set -euo pipefail
fedward-agent pki request --site "${1:?site id}" --dir "${2:?directory}"
echo "now send ${2}/site.csr to the consortium admin (never site.key)"
