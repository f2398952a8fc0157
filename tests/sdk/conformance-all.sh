#!/bin/sh
# Runs the conformance runner on every plugin object in a folder:
#   conformance-all.sh RUNNER PLUGIN_DIR
# Fails when any object fails a check; skipped (77) when the folder holds no plugin.
set -u
runner=$1
dir=$2
n=0
failed=""
for so in "$dir"/*.so; do
    [ -e "$so" ] || continue
    n=$((n + 1))
    echo "== $so"
    "$runner" "$so" || failed="$failed $(basename "$so")"
done
if [ "$n" -eq 0 ]; then
    echo "no plugin objects in $dir"
    exit 77
fi
if [ -n "$failed" ]; then
    echo "conformance failed for:$failed" >&2
    exit 1
fi
echo "$n plugin objects conform"
