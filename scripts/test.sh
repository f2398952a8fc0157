#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine and runs the whole test suite twice: a normal
# build, then a build under AddressSanitizer and UndefinedBehaviorSanitizer.
# Shared test data is read from $TESSERA_TEST_DATA (default ../shared beside the checkout).
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
jobs="$(nproc)"
"$top/scripts/install-deps.sh"
export TESSERA_TEST_DATA="${TESSERA_TEST_DATA:-$top/../shared}"

echo "== build and test: Release"
cmake -S "$top" -B "$top/build-test" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$top/build-test" -j"$jobs"
ctest --test-dir "$top/build-test" --output-on-failure -j"$jobs"

echo "== build and test: AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S "$top" -B "$top/build-asan" -DCMAKE_BUILD_TYPE=Debug \
    -DTESSERA_SANITIZE=address,undefined >/dev/null
cmake --build "$top/build-asan" -j"$jobs"
# Sanitized code runs several times slower: stretch Check's per-test time limits to match.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    CK_TIMEOUT_MULTIPLIER=4 ctest --test-dir "$top/build-asan" --output-on-failure -j"$jobs"
