#!/usr/bin/env bash
# Admin: sign a site's request after checking, out of band, that it comes from that site.
#   deploy/pki/sign-site.sh CA_DIR SITE_ID SITE.csr OUT.crt
set -euo pipefail
fedward-coordinator pki sign --ca-dir "${1:?ca dir}" --site "${2:?site id}" --csr "${3:?csr}" --out "${4:?out}"
