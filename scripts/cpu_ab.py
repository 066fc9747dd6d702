#!/usr/bin/env python3
"""Table of an interleaved CPU decode A/B (scripts/cpu-ab.sh): lines `base|new NAME MS` in RAW,
criterion's folder for the bytes of each point and the read benches of the same bytes.
Usage: cpu_ab.py RAW [target/criterion]"""
import collections, glob, json, os, statistics, sys

raw, root = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "target/criterion")
ms = collections.defaultdict(list)
for line in open(raw):
    who, name, v = line.split()
    ms[(name, who)].append(float(v))
nbytes, reads = {}, {}
for bj in glob.glob(os.path.join(root, "decode", "**", "new", "benchmark.json"), recursive=True):
    b = json.load(open(bj))
    est = json.load(open(os.path.join(os.path.dirname(bj), "estimates.json")))
    by = (b.get("throughput") or {}).get("Bytes")
    parts = b["full_id"].split("/")
    if parts[1] == "read":
        reads[(int(parts[2]), parts[3])] = by / est["median"]["point_estimate"]
    else:
        nbytes[b["full_id"]] = by
print("| shape | tokens | mode | path | threads | MB | base ms | new ms | speedup | new GB/s | % of read | read GB/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
names = sorted({n for n, _ in ms}, key=lambda n: (n.split("/")[1], int(n.split("/")[5]), n.split("/")[2], n.split("/")[3], n.split("/")[4]))
for n in names:
    _, shape, mode, path, threads, tokens = n.split("/")
    b, x = statistics.median(ms[(n, "base")]), statistics.median(ms[(n, "new")])
    by = nbytes.get(n)
    gbs = by / (x * 1e6) if by else float("nan")
    rd = reads.get((by, threads))
    pct = f"{100 * gbs / rd:.0f}%" if rd else "-"
    rds = f"{rd:.1f}" if rd else "-"
    mb = f"{by / 1e6:.1f}" if by else "-"
    t = int(tokens)
    print(f"| {shape} | {t // 1024}K | {mode} | {path} | {threads[1:]} | {mb} | {b:.3f} | {x:.3f} | {b / x:.2f}x | {gbs:.2f} | {pct} | {rds} |")
