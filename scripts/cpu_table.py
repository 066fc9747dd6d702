#!/usr/bin/env python3
"""Markdown tables of the CPU decode bench (benches/decode.rs) from criterion's output.

For every decode point: median ms, GB/s of cache bytes, and that as a fraction of the read of the
same number of bytes with the same threads measured in the same run (`read/<bytes>/t<n>`).
Usage: scripts/cpu_table.py [target/criterion]  (run by scripts/cpu-table.sh)."""
import json, os, sys, glob

root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
rows = {}
reads = {}
for bj in glob.glob(os.path.join(root, "*", "**", "new", "benchmark.json"), recursive=True):
    b = json.load(open(bj))
    est = json.load(open(os.path.join(os.path.dirname(bj), "estimates.json")))
    ns = est["median"]["point_estimate"]
    fid = b["full_id"]
    tp = (b.get("throughput") or {})
    nbytes = tp.get("Bytes")
    parts = fid.split("/")
    if parts[0] == "decode" and parts[1] == "read":
        reads[(int(parts[2]), parts[3])] = nbytes / ns  # GB/s (bytes per ns)
    elif parts[0] == "decode" and len(parts) == 6:
        _, shape, mode, path, threads, tokens = parts
        rows[(shape, int(tokens), mode, threads, path)] = (ns, nbytes)
    elif parts[0] == "prefill":
        rows[("prefill", parts[1], parts[2], parts[3], parts[4])] = (ns, tp.get("Elements"))

paths = sorted({k[4] for k in rows if k[0] != "prefill"})
print("| shape | tokens | mode | threads | MB | " + " | ".join(
    f"{p} ms | {p} GB/s | {p} % of read" for p in paths) + " | read GB/s |")
print("|" + "---|" * (5 + 3 * len(paths) + 1))
for key in sorted(k for k in rows if k[0] != "prefill"):
    shape, tokens, mode, threads, path = key
    if path != paths[0]:
        continue
    cells = []
    nbytes = rows[key][1]
    rd = reads.get((nbytes, threads))
    for p in paths:
        r = rows.get((shape, tokens, mode, threads, p))
        if not r:
            cells += ["", "", ""]
            continue
        gbs = r[1] / r[0]
        cells += [f"{r[0] / 1e6:.3f}", f"{gbs:.2f}", f"{100 * gbs / rd:.0f}%" if rd else ""]
    print(f"| {shape} | {tokens // 1024}K | {mode} | {threads[1:]} | {nbytes / 1e6:.1f} | "
          + " | ".join(cells) + f" | {rd:.1f} |" if rd else " |")
pre = sorted(k for k in rows if k[0] == "prefill")
if pre:
    print()
    print("| prefill | path | ms | new tokens/s |")
    print("|---|---|---|---|")
    for k in pre:
        ns, n = rows[k]
        print(f"| {k[1]} {k[2]} {k[4]} | {k[3]} | {ns / 1e6:.2f} | {n / ns * 1e9:.0f} |")
