#!/usr/bin/env python3
"""Table of kvtier-gpu-bench runs at two page sizes: median ms per point over the runs of each
size, and the ratio. Usage: pagesize_table.py kv-ps32-r1.json kv-ps64-r2.json ... (the page size
is read from the file name, `-ps<N>-`)."""
import collections, json, re, statistics, sys

rows = collections.defaultdict(list)
sizes = set()
for f in sys.argv[1:]:
    ps = int(re.search(r"-ps(\d+)-", f).group(1))
    sizes.add(ps)
    for r in json.load(open(f))["rows"]:
        key = (r["q_heads"], r["kv_heads"], r["dim"], r["batch"], r["seq"], r["mode"])
        rows[key + (ps,)].append(r["ms"])
a, b = sorted(sizes)
print(f"| shape | B | S | mode | ps{a} ms | ps{b} ms | ps{b} / ps{a} |")
print("|---|---|---|---|---|---|---|")
for k in sorted({k[:6] for k in rows}, key=lambda k: (-k[2], k[3], k[4], k[5])):
    x, y = statistics.median(rows[k + (a,)]), statistics.median(rows[k + (b,)])
    print(f"| {k[0]}/{k[1]}/{k[2]} | {k[3]} | {k[4] // 1024}K | {k[5]} | {x:.4f} | {y:.4f} | {y / x:.2f} |")
