"""Issue #15's target table from two sets of results files, before and after:

    python benchmarks/issue15_table.py BEFORE_DIR AFTER_DIR [--vs-torch FILE] [--conditional FILE] [--threads FILE]

Each directory holds the Markdown files of bench_vs_torch.py (--workloads comet step cnn
--threads 1 2), bench_conditional.py and bench_threads.py (by default under the names run_all.py
gives them; a row whose file or table is missing is left out); this script only reads their tables
(no timing of its own) and prints one row per target: the range over the rows it covers, before
and after, the target, and whether the after figures meet it. The load column is the range of
the 1-minute load averages of the rows it was computed from.
"""
from __future__ import annotations

import argparse
import os

FILES = {"vs_torch": "bench_vs_torch.md", "conditional": "bench_conditional.md", "threads": "bench_threads.md"}


def tables(path):
    """{section title: [row dicts]} of the Markdown tables in the file, by the '## ' heading above
    them ("" before the first heading; a later table under the same heading adds its rows)."""
    out, title, header = {}, "", None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("## "):
                title, header = line[3:], None
            elif line.startswith("|"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                if header is None:
                    header = cells
                elif not set(line) <= set("|:- "):
                    out.setdefault(title, []).append(dict(zip(header, cells)))
            else:
                header = None
    return out


def section(tabs, prefix):
    for title, rows in tabs.items():
        if title.startswith(prefix):
            return rows
    return []


def num(s):
    return float(s.replace(",", "").rstrip("x"))


def span(values, digits=2):
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}-{hi:.{digits}f}"


def figures(d, names):
    """{row: (values, loads, lower is better, target)} from the results files of directory d
    (names: the file of each benchmark there); a row whose file or table is missing is left out."""
    def read(key):
        path = os.path.join(d, names[key])
        return tables(path) if os.path.exists(path) else {}

    vs, cond, thr = read("vs_torch"), read("conditional"), read("threads")
    step, cnn, comet = section(vs, "MMoE training step"), section(vs, "Multi-Fashion"), section(vs, "Per-example COMET")
    rows = {}

    def put(key, vals, loads, lower_is_better, target):
        if vals:
            rows[key] = (vals, loads, lower_is_better, target)

    for t in ("1", "2"):
        sel = [r for r in step if r["threads"] == t]
        put(f"MMoE step / GEMM-only time, every gate kind, batch 128 and 1024, {t} thread(s)",
            [num(r["step/GEMM"]) for r in sel], [num(r["load"]) for r in sel], True, 1.10 if t == "1" else 1.15)
    ratios, loads = [], []
    for r1 in (r for r in step if r["batch"] == "1024" and r["threads"] == "1"):
        r2 = next((r for r in step if r["gate"] == r1["gate"] and r["batch"] == "1024" and r["threads"] == "2"), None)
        if r2 is None:
            continue
        step_scale = num(r2["dselectk ex/s"]) / num(r1["dselectk ex/s"])
        gemm_scale = num(r1["GEMM ms"]) / num(r2["GEMM ms"])
        ratios.append(step_scale / gemm_scale)
        loads += [num(r1["load"]), num(r2["load"])]
    put("2-thread / 1-thread step throughput, batch 1024, over what the GEMMs alone scale by", ratios, loads, False, 0.95)
    busy = section(thr, "MMoE training step")
    demo = section(thr, "README demo")
    put("2 threads, one core busy / 1 thread quiet: MMoE step (batch 128, 1024)",
        [num(r["2T busy / 1T quiet"]) for r in busy], [num(r["load"]) for r in busy], False, 0.9)
    put("the same: README demo, default thread count",
        [num(r["1T quiet / default busy"]) for r in demo], [num(r["load"]) for r in demo], False, 0.9)
    put("README demo: default with one core busy / 1 thread with one core busy",
        [num(r["1T busy / default busy"]) for r in demo], [num(r["load"]) for r in demo], False, 1.0)
    mmoe_cnn = [r for r in cnn if r["model"].startswith("MMoE")]
    for t in ("1", "2"):
        sel = [r for r in mmoe_cnn if r["threads"] == t]
        put(f"CNN MMoE training step vs PyTorch, {t} thread(s)", [num(r["ours/PyTorch"]) for r in sel],
            [num(r["load"]) for r in sel], False, 1.5)
    put("CNN step / its GEMM-only time (CNN MMoE, 1 and 2 threads)", [num(r["step/GEMM"]) for r in mmoe_cnn],
        [num(r["load"]) for r in mmoe_cnn], True, 1.3)
    pe = [r for rows_ in cond.values() for r in rows_
          if "speedup" in r and r["gates (k = 2 of 8)"].startswith("per-example, S(Z) binary")]
    put("conditional computation, binary per-example k = 2 of 8, 38% of pairs, vs dense",
        [num(r["speedup"]) for r in pe], [num(r["load"]) for r in pe], False, 2.2)
    for t in ("1", "2"):
        sel = [r for r in comet if r["threads"] == t]
        put(f"COMET gate fwd+bwd vs PyTorch autograd, n = 8, 16, 64, {t} thread(s)",
            [num(r["ours/PyTorch"]) for r in sel], [num(r["load"]) for r in sel], False, 2.0)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    for key, default in FILES.items():
        ap.add_argument(f"--{key.replace('_', '-')}", default=default, help=f"file name (default {default})")
    args = ap.parse_args(argv)
    names = {key: getattr(args, key) for key in FILES}
    before, after = figures(args.before, names), figures(args.after, names)
    print("| benchmark | before | load | after | load | target | met (after) |")
    print("|---|---:|---:|---:|---:|---:|:---|")
    for key, (vals, loads, lower, target) in after.items():
        if key not in before:
            continue
        bvals, bloads = before[key][0], before[key][1]
        ok = all(v <= target for v in vals) if lower else all(v >= target for v in vals)
        some = any(v <= target for v in vals) if lower else any(v >= target for v in vals)
        met = "yes" if ok else ("partly" if some else "no")
        print(f"| {key} | {span(bvals)} | {span(bloads, 1)} | {span(vals)} | {span(loads, 1)} | "
              f"{'<=' if lower else '>='} {target:g} | {met} |")


if __name__ == "__main__":
    main()
