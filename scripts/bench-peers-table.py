#!/usr/bin/env python3
"""Prints the markdown table of docs/benchmarks.md from the results scripts/bench-peers.sh wrote
in a folder: for each type, test and thread count, each engine's tokens/s in every run, tessera
over each peer as measured in the same run (the range over the runs), and tessera's fraction of
the int8 or f32 peak (prefill) or of the bandwidth roofline (decode) its own run measured.
    scripts/bench-peers-table.py OUT
"""
import glob
import json
import os
import re
import sys

ENGINES = ["tessera", "llama.cpp", "ik_llama.cpp"]
TYPE_ORDER = ["q4_0", "q8_0", "q4_k_m", "f16"]


def load(folder):
    """{(run, engine, type): {(test, threads): (mean, std, fraction or None)}}"""
    found = {}
    for path in glob.glob(os.path.join(folder, "*.json")):
        m = re.fullmatch(r"(\d+)-(.+)-([a-z0-9_]+)\.json", os.path.basename(path))
        if not m or m.group(2) not in ENGINES:
            continue
        run, engine, typ = int(m.group(1)), m.group(2), m.group(3)
        try:
            with open(path) as f:
                data = json.load(f)
        except ValueError:
            print("bench-peers-table.py: %s: not JSON (a run still writing it?), left out" % path,
                  file=sys.stderr)
            continue
        rows = {}
        if engine == "tessera":
            for r in data["results"]:
                t = r["threads"]
                if r["n_prompt"] > 0:
                    rows[("pp%d" % r["n_prompt"], t)] = (
                        r["prefill_tps_mean"], r["prefill_tps_std"],
                        r.get("prefill_peak_fraction"))
                if r["n_gen"] > 0:
                    rows[("tg%d" % r["n_gen"], t)] = (
                        r["decode_tps_mean"], r["decode_tps_std"], r.get("roofline_fraction"))
        else:
            for r in data:
                test = "pp%d" % r["n_prompt"] if r["n_prompt"] > 0 else "tg%d" % r["n_gen"]
                rows[(test, r["n_threads"])] = (r["avg_ts"], r["stddev_ts"], None)
        found[(run, engine, typ)] = rows
    return found


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: scripts/bench-peers-table.py OUT")
    found = load(sys.argv[1])
    if not found:
        sys.exit("bench-peers-table.py: %s: no results (RUN-ENGINE-TYPE.json)" % sys.argv[1])
    runs = sorted({k[0] for k in found})
    engines = [e for e in ENGINES if any(k[1] == e for k in found)]
    types = sorted({k[2] for k in found},
                   key=lambda t: TYPE_ORDER.index(t) if t in TYPE_ORDER else 99)
    peers = [e for e in engines if e != "tessera"]
    head = ["type", "test", "threads"] + ["%s (run %s)" % (e, "/".join(map(str, runs)))
                                          for e in engines]
    head += ["tessera / %s" % p for p in peers] + ["tessera: of peak / roofline"]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + " |")
    keys = sorted({key for rows in found.values() for key in rows},
                  key=lambda k: (k[0][:2] != "pp", int(k[0][2:]), k[1]))
    for typ in types:
        for key in keys:
            cells = [typ.upper(), key[0], str(key[1])]
            for e in engines:
                vals = [found.get((r, e, typ), {}).get(key) for r in runs]
                cells.append(" / ".join("%.1f" % v[0] if v else "-" for v in vals))
            for p in peers:
                ratios = []
                for r in runs:
                    a = found.get((r, "tessera", typ), {}).get(key)
                    b = found.get((r, p, typ), {}).get(key)
                    if a and b and b[0] > 0:
                        ratios.append(a[0] / b[0])
                cells.append(("%.2f" % ratios[0] if len(ratios) == 1 else
                              "%.2f-%.2f" % (min(ratios), max(ratios))) if ratios else "-")
            fr = [found.get((r, "tessera", typ), {}).get(key) for r in runs]
            cells.append(" / ".join("%.0f%%" % (100 * v[2]) if v and v[2] is not None else "-"
                                    for v in fr))
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
