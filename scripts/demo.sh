#!/usr/bin/env bash
# The main job on an embedded default: install, then run `wsi-ssl demo` (synthetic slides,
# no servers). Extra arguments go to `wsi-ssl demo` (e.g. slide paths, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
wsi-ssl demo "$@"
