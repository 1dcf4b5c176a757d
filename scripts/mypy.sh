#!/usr/bin/env bash
# Type-check wsi_ssl as it is installed: storage/ and cli/ are the packages wsi_ssl.storage and
# wsi_ssl.cli (pyproject package-dir), a mapping mypy cannot follow from the source folders. A
# tree of symlinks in build/mypy gives mypy that layout; messages are mapped back to source paths.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tree=$repo/build/mypy
mkdir -p "$tree/wsi_ssl"
find "$tree/wsi_ssl" -maxdepth 1 -type l ! -exec test -e {} \; -delete # links to removed files
for entry in wsi_ssl/*; do
    ln -sfn "$repo/$entry" "$tree/$entry"
done
ln -sfn "$repo/storage" "$tree/wsi_ssl/storage"
ln -sfn "$repo/cli" "$tree/wsi_ssl/cli"
cd "$tree"
mypy --config-file "$repo/pyproject.toml" --cache-dir "$repo/build/mypy_cache" -p wsi_ssl "$@" |
    sed -e "s#^wsi_ssl/storage/#storage/#" -e "s#^wsi_ssl/cli/#cli/#"
