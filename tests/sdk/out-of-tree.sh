#!/bin/sh
# Uses the SDK the way a plugin author does, from an installed Tessera only:
#   out-of-tree.sh BUILD_DIR SOURCE_DIR
# installs BUILD_DIR into a scratch prefix, builds sdk/template with find_package(Tessera) and
# again with nothing but `pkg-config --cflags tessera` and cc, then loads both results with the
# installed `tessera plugins info` and the installed conformance runner. Also checks that
# tessera_add_plugin warns about a target not named STAGE-NAME and makes the LINKS of an
# object that provides several plugins. Any failing step stops the test with its name.
set -eu
build=$1
src=$2
plugin=decoder-template-greedy.so
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
[ -f "$cmake_dir/$plugin" ] || die "cmake build: no plugins/$plugin"
run "cmake install (author prefix)" cmake --install "$work/cmake-build" --prefix "$work/author"
[ -n "$(find "$work/author" -path "*/tessera/plugins/$plugin")" ] ||
    die "cmake install: $plugin is not under <prefix>/<libdir>/tessera/plugins"

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
    -o "$pc_dir/$plugin" "$src/sdk/template/template_greedy.c"

# 3. Both results load in the installed host and pass the installed runner.
for dir in "$cmake_dir" "$pc_dir"; do
    run "tessera plugins info ($dir)" env TESSERA_PLUGIN_PATH="$dir" \
        "$prefix/bin/tessera" plugins info template-greedy
    grep -q "ban_token" "$work/step.log" ||
        { cat "$work/step.log" >&2; die "plugins info: the parameter ban_token is not listed"; }
    run "conformance ($dir)" "$prefix/bin/tessera-plugin-test" "$dir/$plugin"
    tail -n 1 "$work/step.log"
done

# 4. tessera_add_plugin: a target not named STAGE-NAME is a warning; LINKS become links to the
#    object, which the host opens by their names, in the build and the install folder.
names=$work/names
mkdir "$names"
cp "$src/sdk/template/template_greedy.c" "$names/"
cat >"$names/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.20)
project(names C)
find_package(Tessera REQUIRED)
tessera_add_plugin(greedy-thing SOURCES template_greedy.c)
tessera_add_plugin(decoder-template-greedy SOURCES template_greedy.c
  LINKS decoder-template-greedy-again)
CMAKE
run "cmake configure (names)" cmake -S "$names" -B "$names/build" -DCMAKE_PREFIX_PATH="$prefix"
grep -q "tessera_add_plugin(greedy-thing): 'greedy-thing.so' is not named" \
    "$work/step.log" || { cat "$work/step.log" >&2; die "no warning for the target greedy-thing"; }
if grep -q "tessera_add_plugin(decoder-template-greedy)" "$work/step.log"; then
    cat "$work/step.log" >&2
    die "a warning for decoder-template-greedy, which is named right"
fi
run "cmake build (names)" cmake --build "$names/build"
run "cmake install (names)" cmake --install "$names/build" --prefix "$work/names-prefix"
installed=$(dirname "$(find "$work/names-prefix" -name "$plugin")")
for dir in "$names/build/plugins" "$installed"; do
    link=$dir/decoder-template-greedy-again.so
    [ -L "$link" ] && [ "$(readlink "$link")" = "$plugin" ] ||
        die "LINKS: $link is not a link to $plugin"
    # Opened by the link's name, the object says it holds 'template-greedy' only.
    if env TESSERA_PLUGIN_PATH="$dir" "$prefix/bin/tessera" plugins info template-greedy-again \
        >/dev/null 2>"$work/step.log"; then
        die "LINKS: plugins info template-greedy-again succeeded"
    fi
    grep -q "$link: holds no decoder plugin 'template-greedy-again' but decoder 'template-greedy'" \
        "$work/step.log" || { cat "$work/step.log" >&2; die "LINKS: $link was not opened"; }
done
echo "out-of-tree: all steps passed"
