#!/usr/bin/env bash
# Type-check wsi_ssl as it is installed: storage/ and cli/ are the packages wsi_ssl.storage and
# wsi_ssl.cli (pyproject package-dir), a mapping mypy cannot follow from the source folders. A
# tree of symlinks in build/mypy gives mypy that layout; messages are mapped back to source paths.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tree=$repo/build/mypy
rm -rf "$tree" && mkdir -p "$tree/wsi_ssl"
for entry in wsi_ssl/*; do
    ln -s "$repo/$entry" "$tree/wsi_ssl/"
done
ln -s "$repo/storage" "$tree/wsi_ssl/storage"
ln -s "$repo/cli" "$tree/wsi_ssl/cli"
cd "$tree"
mypy --config-file "$repo/pyproject.toml" --cache-dir "$repo/build/mypy_cache" -p wsi_ssl "$@" |
    sed -e "s#^wsi_ssl/storage/#storage/#" -e "s#^wsi_ssl/cli/#cli/#"
