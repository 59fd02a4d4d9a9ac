#!/usr/bin/env bash
# Draws the pictures of docs/patterns.md: each docs/images/NAME.png there is
# `attncc analyze examples/specs/NAME.yaml (or .json) --png`, nothing else.
#
#   bash docs/images/make.sh              # every picture docs/patterns.md shows
#   bash docs/images/make.sh na2d dense   # some of them
#   IMAGES=/tmp/x bash docs/images/make.sh dense   # into another folder
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${IMAGES:-$root/docs/images}"
mkdir -p "$out"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  mapfile -t names < <(grep -o 'images/[A-Za-z0-9_]*\.png' "$root/docs/patterns.md" | sed 's|^images/||; s|\.png$||')
fi
for name in "${names[@]}"; do
  spec="$root/examples/specs/$name.yaml"
  [ -f "$spec" ] || spec="$root/examples/specs/$name.json"
  [ -f "$spec" ] || { echo "make.sh: no examples/specs/$name.yaml or .json" >&2; exit 1; }
  start=$SECONDS
  attncc analyze "$spec" --png "$out/$name.png" > /dev/null
  echo "$out/$name.png ($((SECONDS - start)) s)"
done
