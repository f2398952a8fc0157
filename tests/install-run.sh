#!/bin/sh
# An installed Tessera finds its own plugins, whatever the prefix:
#   install-run.sh BUILD_DIR
# installs BUILD_DIR into a scratch prefix (with a space in its path), then, from another
# folder and without TESSERA_PLUGIN_PATH, checks that the installed `tessera` lists the shipped
# plugins from <prefix>/<libdir>/tessera/plugins and that `tessera run` on stories260K.gguf
# prints llama2.c's greedy text. The run needs the shared data (TESSERA_TEST_DATA): without it
# the test reports itself skipped (77) after the checks that do not.
set -eu
build=$1
data=${TESSERA_TEST_DATA:-${TESSERA_TEST_DATA_CONFIGURED:-../shared}}
work=$(mktemp -d "${TMPDIR:-/tmp}/tessera-install-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix="$work/any prefix"

die() {
    echo "install-run: FAILED: $*" >&2
    exit 1
}

cmake --install "$build" --prefix "$prefix" >"$work/install.log" 2>&1 ||
    { cat "$work/install.log" >&2; die "cmake --install"; }
cpu=$(find "$prefix" -name backend-cpu.so)
[ -n "$cpu" ] || die "install: no backend-cpu.so in the prefix"
plugins=$(realpath "$(dirname "$cpu")")
tessera=$prefix/bin/tessera
unset TESSERA_PLUGIN_PATH
cd "$work"

"$tessera" plugins list >list.txt 2>err.txt || { cat err.txt >&2; die "plugins list"; }
[ ! -s err.txt ] || { cat err.txt >&2; die "plugins list: unexpected warnings"; }
for name in cpu gguf flash reference full streaming greedy sample; do
    grep -q "^$name " list.txt || { cat list.txt >&2; die "plugins list: no '$name'"; }
done

"$tessera" -vv plugins info cpu >info.txt 2>err.txt || { cat err.txt >&2; die "plugins info"; }
grep -qF "plugin folder $plugins (from the install folder): searched, " err.txt ||
    { cat err.txt >&2; die "-vv: the install folder $plugins is not searched"; }
grep -qF "  file:     $plugins/backend-cpu.so" info.txt ||
    { cat info.txt >&2; die "plugins info cpu: not the installed file"; }

model=$data/models/stories260K.gguf
if [ ! -f "$model" ]; then
    echo "skipped: $model is missing (set TESSERA_TEST_DATA)"
    exit 77
fi
"$tessera" run -m "$model" -p "Once upon a time" -n 196 --temperature 0 >out.txt 2>err.txt ||
    { cat err.txt >&2; die "run"; }
cmp -s out.txt "$data/models/stories260K.greedy.once.txt" ||
    { diff out.txt "$data/models/stories260K.greedy.once.txt" >&2; die "run: not llama2.c's text"; }
echo "install-run: the installed tessera found its plugins and generated llama2.c's text"
