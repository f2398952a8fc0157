#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine, builds Tessera, and generates text:
#   scripts/run.sh MODEL.gguf [tessera run options...]
# e.g. scripts/run.sh ../shared/models/stories260K.gguf -p "Once upon a time" -n 64
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: scripts/run.sh MODEL [tessera run options...]" >&2; exit 2; }
model="$1"; shift
"$top/scripts/install-deps.sh"
cmake -S "$top" -B "$top/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$top/build" -j"$(nproc)" >/dev/null
exec "$top/build/tessera" run -m "$model" "$@"
