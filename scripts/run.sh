#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine, builds Tessera, and generates text:
#   scripts/run.sh MODEL.gguf [tessera run options...]
# e.g. scripts/run.sh ../shared/models/stories260K.gguf -p "Once upon a time" -n 64
# The set-up steps (apt, cmake, the compiler) keep their output to themselves unless one fails:
# then that step's whole output is shown and the script stops.
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: scripts/run.sh MODEL [tessera run options...]" >&2; exit 2; }
model="$1"; shift

quietly() {
    local log status=0
    log="$(mktemp)"
    "$@" >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        echo "scripts/run.sh: $* failed (exit $status):" >&2
        cat "$log" >&2
    fi
    rm -f "$log"
    return "$status"
}

quietly "$top/scripts/install-deps.sh"
quietly cmake -S "$top" -B "$top/build" -DCMAKE_BUILD_TYPE=Release
quietly cmake --build "$top/build" -j"$(nproc)"
exec "$top/build/tessera" run -m "$model" "$@"
