"""Markdown tables + PNG from evalx results JSON. Usage: python report.py results.json OUTDIR"""
import json, sys
from pathlib import Path
import numpy as np
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

res = json.loads(Path(sys.argv[1]).read_text()); out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
null = res.pop("_null", {})
names = list(res)
srcs = sorted(next(iter(res.values()))["loso"])
lines = []
for mode in ("loso", "arena_only"):
    ss = [s for s in srcs if s in next(iter(res.values()))[mode]]
    hdr = "| features | " + " | ".join(ss) + " | **mean** | CPT(50%) mean | sources > length |"
    lines += [f"\n{mode}\n", hdr, "|" + "---|" * (len(ss) + 4)]
    first = res[names[0]][mode]
    for base in ("length", "random"):
        v = [first[s][base]["apgr"] for s in ss]
        c = [first[s][base]["cpt50"] for s in ss]
        lines.append(f"| *{base} baseline* | " + " | ".join(f"{x:.3f}" for x in v) + f" | {np.mean(v):.3f} | {np.nanmean(c):.1%} | |")
    for n in names:
        r = res[n][mode]
        v = [r[s]["router"]["apgr"] for s in ss]; c = [r[s]["router"]["cpt50"] for s in ss]
        above = sum(r[s]["router"]["apgr"] > r[s]["length"]["apgr"] for s in ss)
        lines.append(f"| {n} | " + " | ".join(f"{x:.3f}" for x in v) + f" | **{np.mean(v):.3f}** | {np.nanmean(c):.1%} | {above}/{len(ss)} |")
if null:
    lines.append("\nrandom-router APGR spread (std over 200 seeds): " + ", ".join(f"{s} n={v['n']} ±{v['random_apgr_std']:.3f}" for s, v in null.items()))
md = "\n".join(lines); print(md); (out / "tables.md").write_text(md + "\n")
for mode in ("loso", "arena_only"):
    ss = [s for s in srcs if s in res[names[0]][mode]]
    fig, ax = plt.subplots(figsize=(11, 0.32 * (len(names) + 2) + 1.5))
    rows = ["length", "random"] + names
    vals = [[res[names[0]][mode][s][r]["apgr"] for s in ss] if r in ("length", "random") else [res[r][mode][s]["router"]["apgr"] for s in ss] for r in rows]
    y = np.arange(len(rows))
    for j, s in enumerate(ss):
        ax.scatter([v[j] for v in vals], y, label=s, s=18)
    ax.scatter([np.mean(v) for v in vals], y, marker="|", s=300, color="k", label="mean")
    ax.axvline(0.5, color="grey", ls=":"); ax.axvline(0.55, color="red", ls=":", lw=0.8)
    ax.set_yticks(y); ax.set_yticklabels(rows, fontsize=8); ax.invert_yaxis(); ax.set_xlabel("APGR (gpt-4-1106 vs Mixtral-8x7B)")
    ax.set_title(f"edge-model signals, {mode.replace('_', '-')} (subsample, see docs/router.md)")
    ax.legend(fontsize=7, loc="lower right"); fig.tight_layout(); fig.savefig(out / f"apgr-{mode}.png", dpi=100); plt.close(fig)
