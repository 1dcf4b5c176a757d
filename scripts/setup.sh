#!/usr/bin/env bash
# Install wsi-ssl and everything it needs (system packages, then Python packages).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    # fonts for plots; chromium + its driver for the page's browser tests (pytest -m browser);
    # openslide itself comes from the openslide-bin wheel
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends fonts-dejavu-core \
        chromium chromium-driver) \
        >/dev/null 2>&1 || echo "setup: apt-get step skipped (no network or no apt)"
fi
python -m pip install -q --upgrade pip
# torch and torchvision pinned as a pair that imports together (lightly needs torchvision).
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[dev]"
