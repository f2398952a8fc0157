#!/bin/sh
# Runs the conformance runner on an object of broken fixture plugins and checks that exactly
# the expected checks fail, each for the expected reason, that the closing count agrees, and
# that the exit status is 1:
#   expect-failures.sh RUNNER PLUGIN.so EXPECTED_FILE
# Each line of EXPECTED_FILE is "FAIL plugin/check: words", the words being a part of the
# reason the runner must give for that failure, or "FAIL plugin/check" where the reason
# depends on the build (a crash is a signal, or a sanitizer's exit).
set -u
runner=$1
so=$2
expected=$3
out=$(mktemp)
trap 'rm -f "$out" "$out.got" "$out.want"' EXIT
"$runner" "$so" >"$out"
status=$?
cat "$out"
sed -n 's/^\(FAIL [^:]*\):.*/\1/p' "$out" | sort >"$out.got"
sed 's/: .*//' "$expected" | sort >"$out.want"
ok=1
if ! diff -u "$out.want" "$out.got"; then
    echo "expect-failures: the FAIL lines differ from $expected (- expected, + got)" >&2
    ok=0
fi
while IFS= read -r line; do
    name=${line%%: *}
    words=${line#*: }
    [ "$words" = "$line" ] && continue
    if ! grep -F "$name: " "$out" | grep -qF -- "$words"; then
        echo "expect-failures: '$name' does not fail for the reason '$words'" >&2
        ok=0
    fi
done <"$expected"
n_fail=$(wc -l <"$out.want" | tr -d ' ')
n_pass=$(grep -c '^PASS ' "$out")
if [ "$(tail -n 1 "$out")" != "$n_pass passed, $n_fail failed" ]; then
    echo "expect-failures: closing line is '$(tail -n 1 "$out")'" >&2
    ok=0
fi
if [ "$status" -ne 1 ]; then
    echo "expect-failures: exit status $status, expected 1" >&2
    ok=0
fi
[ "$ok" -eq 1 ]
