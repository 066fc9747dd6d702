#!/usr/bin/env python3
"""Merges the eval reports of scripts/policy-table.sh into the retention-policy table.

    python3 scripts/policy_table.py OUT_DIR [--docs docs/results.md] [--json merged.json]
        [--markers policy|quant]   which generated block of the docs file to replace (default policy)

PPL: the negative log-likelihoods of every scored token of every PPL report are pooled per config
(two speeches x 1024 tokens), and the ratio is exp(mean NLL - mean NLL of `fp`). Bytes per token are
per token position over all layers, as the eval reports them (device = hot + warm + metadata on the
device; cold and archive are host RAM), averaged over the speeches. Passkey: hits over every trial
report, per context. Decode tok/s: mean over the PPL runs (several processes shared the machine,
so compare rows with each other, not with other tables).
"""
import glob
import json
import math
import os
import sys

F16_TOKEN_BYTES = 2 * 3 * 64 * 2 * 30  # SmolLM2-135M: K and V, 3 kv heads, d 64, f16, 30 layers


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    out_dir = args[0]
    docs = args[args.index("--docs") + 1] if "--docs" in args else None
    merged_path = args[args.index("--json") + 1] if "--json" in args else None
    markers = args[args.index("--markers") + 1] if "--markers" in args else "policy"
    order, rows = [], {}
    meta = {}

    def row(cfg):
        name = cfg["name"]
        if name not in rows:
            order.append(name)
            rows[name] = {"config": cfg, "nll": 0.0, "scored": 0, "runs": [], "passkey": {}}
        return rows[name]

    files = sorted(glob.glob(os.path.join(out_dir, "*.json")))
    if not files:
        sys.exit(f"no reports in {out_dir}")
    for path in files:
        if os.path.basename(path).startswith("merged"):
            continue
        rep = json.load(open(path))
        meta.setdefault("model", rep.get("model"))
        meta.setdefault("decode_weights", rep.get("decode_weights"))
        for res in rep["results"]:
            r = row(res["config"])
            for p in res["perplexity"]:
                for run in p["runs"]:
                    r["nll"] += run["mean_nll"] * run["scored"]
                    r["scored"] += run["scored"]
                    r["runs"].append(run)
            pk = res["passkey"]
            if pk["trials"]:
                ctx = str(pk["context_tokens"])
                d = r["passkey"].setdefault(ctx, {})
                for t in pk["trials"]:
                    k = f'{t["depth"]:g}'
                    hit, n = d.get(k, (0, 0))
                    d[k] = (hit + int(t["correct"]), n + 1)
    base = rows.get("fp")
    if base is None or base["scored"] == 0:
        sys.exit("no fp perplexity in the reports: it is the baseline")
    base_nll = base["nll"] / base["scored"]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    contexts = sorted({c for r in rows.values() for c in r["passkey"]}, key=int)
    lines = []
    lens = sorted({x["tokens"] for r in rows.values() for x in r["runs"]})
    at = "/".join(f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in lens)
    head = f"| config | policy | budget (of f16) | PPL @{at} | PPL ratio | device B/token | device / f16 | host cold B/token | host archive B/token | tokens kept | decode tok/s |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for c in contexts:
        n = max(sum(v[1] for v in rows[name]["passkey"].get(c, {}).values()) for name in order)
        label = f"{int(c) // 1024}K" if int(c) % 1024 == 0 else c
        head += f" passkey @{label} (of {n}) |"
        sep += "---:|"
    lines += [head, sep]
    merged = []
    for name in order:
        r = rows[name]
        cfg = r["config"]
        pol = cfg.get("policy")
        policy = pol["name"] if pol else ("quest (selection)" if "~quest:" in name else "-")
        budget = f'{pol["f16_fraction"] * 100:g}%' if pol else "-"
        runs = r["runs"]
        nll = r["nll"] / r["scored"] if r["scored"] else float("nan")
        ppl = math.exp(nll) if r["scored"] else float("nan")
        ratio = math.exp(nll - base_nll) if r["scored"] else float("nan")
        dev = mean([x["memory"]["device_bytes_per_token"] for x in runs])
        tpl = [x["memory"]["tokens_per_layer"] for x in runs]
        cold = mean([x["memory"]["cold_bytes"] / t for x, t in zip(runs, tpl)])
        arch = mean([x["memory"].get("archive_bytes", float("nan")) / t for x, t in zip(runs, tpl)])
        kept = mean([1 - x["memory"].get("evicted_tokens", 0) / t for x, t in zip(runs, tpl)])
        tps = mean([x["decode_tok_per_s"] for x in runs])
        line = (
            f"| `{name}` | {policy} | {budget} | {ppl:.3f} | {ratio:.4f} | {dev:.0f} | "
            f"{dev / F16_TOKEN_BYTES:.3f} | {cold:.0f} | {arch:.0f} | {kept:.3f} | {tps:.1f} |"
        )
        pk_out = {}
        for c in contexts:
            d = r["passkey"].get(c, {})
            hit, n = sum(v[0] for v in d.values()), sum(v[1] for v in d.values())
            per = "/".join(str(d[k][0]) for k in sorted(d, key=float))
            line += f" {100 * hit / n:.0f}% ({per}) |" if n else " - |"
            pk_out[c] = {"hits": hit, "trials": n, "by_depth": d}
        lines.append(line)
        merged.append({
            "config": name, "policy": policy, "budget": budget, "ppl": ppl, "ppl_ratio": ratio,
            "scored": r["scored"], "device_bytes_per_token": dev, "cold_bytes_per_token": cold,
            "archive_bytes_per_token": arch, "kept_fraction": kept, "decode_tok_per_s": tps,
            "passkey": pk_out,
        })
    if contexts:
        lines.append("")
        lines.append("Passkey columns: hits over all trials, then per depth 0/25/50/75/100 %.")
    table = "\n".join(lines)
    print(table)
    if merged_path:
        with open(merged_path, "w") as f:
            json.dump({"meta": meta, "rows": merged}, f, indent=1)
            f.write("\n")
    if docs:
        text = open(docs).read()
        tag = "" if markers == "policy" else f" ({markers})"
        begin = f"<!-- BEGIN GENERATED by scripts/policy_table.py{tag}: do not edit by hand -->"
        end = f"<!-- END GENERATED {markers} table -->"
        if begin not in text or end not in text:
            sys.exit(f"{docs} has no {markers}-table markers")
        a, rest = text.split(begin, 1)
        _, b = rest.split(end, 1)
        with open(docs, "w") as f:
            f.write(a + begin + "\n\n" + table + "\n\n" + end + b)


if __name__ == "__main__":
    main()
