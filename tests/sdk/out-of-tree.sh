#!/bin/sh
# Uses the SDK the way a plugin author does, from an installed Tessera only:
#   out-of-tree.sh BUILD_DIR SOURCE_DIR
# installs BUILD_DIR into a scratch prefix, builds sdk/template with find_package(Tessera) and
# again with nothing but `pkg-config --cflags tessera` and cc, then loads both results with the
# installed `tessera plugins info` and the installed conformance runner. Any failing step
# stops the test with its name.
set -eu
build=$1
src=$2
work=$(mktemp -d "${TMPDIR:-/tmp}/tessera-out-of-tree.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix

die() {
    echo "out-of-tree: FAILED: $*" >&2
    exit 1
}
run() {
    # Shows a step's output only when it fails, so the log stays readable.
    name=$1
    shift
    echo "== $name"
    "$@" >"$work/step.log" 2>&1 || { cat "$work/step.log" >&2; die "$name: $*"; }
}

run "install" cmake --install "$build" --prefix "$prefix"
for f in bin/tessera bin/tessera-plugin-test include/tessera/common.h include/tessera/sdk.h \
         include/tessera/decoder.h include/tessera/cache.h; do
    [ -e "$prefix/$f" ] || die "install: $f is missing from the prefix"
done
config=$(find "$prefix" -name TesseraConfig.cmake | head -n 1)
pc=$(find "$prefix" -name tessera.pc | head -n 1)
[ -n "$config" ] || die "install: no TesseraConfig.cmake"
[ -n "$pc" ] || die "install: no tessera.pc"

# 1. CMake: find_package(Tessera) + tessera_add_plugin, as the template's README says.
run "cmake configure" cmake -S "$src/sdk/template" -B "$work/cmake-build" \
    -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="-Wall -Wextra -Wshadow -Wstrict-prototypes -Werror"
run "cmake build" cmake --build "$work/cmake-build"
cmake_dir=$work/cmake-build/plugins
[ -f "$cmake_dir/template-greedy.so" ] || die "cmake build: no plugins/template-greedy.so"
run "cmake install (author prefix)" cmake --install "$work/cmake-build" --prefix "$work/author"
[ -n "$(find "$work/author" -path '*/tessera/plugins/template-greedy.so')" ] ||
    die "cmake install: template-greedy.so is not under <prefix>/<libdir>/tessera/plugins"

# 2. pkg-config and a compiler, no build system.
PKG_CONFIG_PATH=$(dirname "$pc")
export PKG_CONFIG_PATH
cflags=$(pkg-config --cflags tessera) || die "pkg-config --cflags tessera"
plugindir=$(pkg-config --variable=plugindir tessera) || die "pkg-config --variable=plugindir"
[ "$(realpath -m "$plugindir")" = "$(realpath -m "$(dirname "$pc")/../tessera/plugins")" ] ||
    die "pkg-config: plugindir '$plugindir' is not <libdir>/tessera/plugins of the prefix"
pc_dir=$work/pc-build
mkdir "$pc_dir"
# shellcheck disable=SC2086 # cflags is a list of flags
run "pkg-config build" cc -std=c11 -Wall -Wextra -Werror $cflags -shared -fPIC \
    -o "$pc_dir/template-greedy.so" "$src/sdk/template/template_greedy.c"

# 3. Both results load in the installed host and pass the installed runner.
for dir in "$cmake_dir" "$pc_dir"; do
    run "tessera plugins info ($dir)" env TESSERA_PLUGIN_PATH="$dir" \
        "$prefix/bin/tessera" plugins info template-greedy
    grep -q "ban_token" "$work/step.log" ||
        { cat "$work/step.log" >&2; die "plugins info: the parameter ban_token is not listed"; }
    run "conformance ($dir)" "$prefix/bin/tessera-plugin-test" "$dir/template-greedy.so"
    tail -n 1 "$work/step.log"
done
echo "out-of-tree: all steps passed"
