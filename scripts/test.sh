#!/usr/bin/env bash
# The test command: install what is needed, lint, type-check, then run the whole suite (slow
# learning checks included). Tests marked gpu skip without CUDA; pass extra pytest arguments after the script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check .
ruff format --check .
bash scripts/mypy.sh
python -m pytest -q "$@"
