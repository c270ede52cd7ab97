"""PST vs magnitude / movement pruning: the table (accuracy, trainable share, exported size) and a plot.

    python benchmarks/glue_minilm.py --tasks sst2 mrpc --methods pst-50 mag-lora-50 mag-full-50 mov-50 ... \
        --results benchmarks/results/pst_minilm --out runs/pst_minilm
    python benchmarks/pst_table.py          # -> benchmarks/results/pst_sparsity.{md,png}

The export columns come from exporting each run's best checkpoint (``peftlab export-sparse``'s code path:
a plain HF folder + the compact sparse file); they are cached in pst_minilm_export.json so the table can
be rebuilt without the run folders. The dense LoRA / full fine-tuning references come from glue_minilm.jsonl
(same loop, data, seed and epochs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FAMILIES = {"pst": "PST", "mag-lora": "magnitude + LoRA update", "mag-full": "magnitude + full update",
            "mov": "movement (full update)"}
SPARSITIES = (50, 70, 90)
GRID = {f"{fam}-{s}" for fam in FAMILIES for s in SPARSITIES}  # the table's rows; other runs are listed below it


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def export_stats(runs: Path, cache_path: Path, keys: list[tuple[str, str]]) -> dict:
    """``task/method`` -> export summary; runs missing from the cache are exported now."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    todo = [(t, m) for t, m in keys if f"{t}/{m}" not in cache and (runs / f"{t}-{m}-s42" / "best").is_dir()]
    if todo:
        from peftlab.cli.train import load_run as _load_run
        from peftlab.tuners.sparsity import export as sparse

        for t, m in todo:
            model, *_ = _load_run(runs / f"{t}-{m}-s42", [])
            with tempfile.TemporaryDirectory() as d:
                cache[f"{t}/{m}"] = sparse.export_all(model, d)
            print(t, m, cache[f"{t}/{m}"], flush=True)
        cache_path.write_text(json.dumps(cache, indent=2, sort_keys=True))
    return cache


def _cell(r: dict | None, task: str) -> str:
    if r is None:
        return "—"
    f = r["final"]
    return f"{f['f1']:.3f} / {f['accuracy']:.3f}" if task == "mrpc" else f"{f['accuracy']:.3f}"


def to_markdown(rows: list[dict], refs: list[dict], exports: dict, tasks=("sst2", "mrpc")) -> str:
    def get(rs, m, t):
        x = [r for r in rs if r["bench_method"] == m and r["task"] == t and r["epochs"] == 1]
        return x[-1] if x else None

    names = {"sst2": "SST-2 acc", "mrpc": "MRPC F1 / acc"}
    head = ("| final sparsity | method | trainable params (share of backbone) | "
            + " | ".join(names[t] for t in tasks) + " | realised sparsity | compact file / dense fp32 |")
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for ref, label in (("lora", "dense LoRA r=8 (q, v)"), ("full", "dense full fine-tuning")):
        r = next((get(refs, ref, t) for t in tasks if get(refs, ref, t)), None)
        if r:
            share = r["trainable_params"] / (r["total_params"] - (r["adapter_params"] or 0))
            lines.append(f"| 0% | {label} | {r['trainable_params']:,} ({share:.2%}) | "
                         + " | ".join(_cell(get(refs, ref, t), t) for t in tasks) + " | — | — |")
    for s in SPARSITIES:
        for fam, label in FAMILIES.items():
            m = f"{fam}-{s}"
            rs = [get(rows, m, t) for t in tasks]
            if not any(rs):
                continue
            r = next(x for x in rs if x)
            share = r["trainable_params"] / (r["total_params"] - (r["adapter_params"] or 0))
            ex = next((exports[f"{t}/{m}"] for t in tasks if f"{t}/{m}" in exports), None)
            exc = (f"{ex['sparsity']:.4f} | {ex['compact_ratio']:.3f} ({ex['compact_bytes'] / 2**20:.1f} MiB)"
                   if ex else "— | —")
            lines.append(f"| {s}% | {label} | {r['trainable_params']:,} ({share:.2%}) | "
                         + " | ".join(_cell(x, t) for x, t in zip(rs, tasks)) + f" | {exc} |")
    note = ("\nMiniLM-L6 (22.7M), 1 epoch, batch 32, max length 128, seed 42, SST-2 on its 8k training subset, MRPC "
            "full; all block linears (q, k, v, o, FFN in/out) pruned; cubic schedule with 10% warm-up and 30% "
            "cool-down; final dev score. Learning rates: PST and magnitude + LoRA 5e-4, full-update baselines "
            "5e-5 (full fine-tuning's). Trainable counts include the task head; the share is against the "
            "backbone. Realised sparsity and sizes are of the exported best checkpoint (first task measured); "
            "the dense baseline of the compact file is the sparsified layers' weights in fp32. MRPC's majority "
            "class scores F1 0.812 / acc 0.684.\n")
    other = list({(r["bench_method"], r["task"], r["epochs"]): r for r in rows
                  if not (r["bench_method"] in GRID and r["epochs"] == 1)}.values())
    if other:  # runs outside the grid (another schedule, learning rate or budget): listed, not tabulated
        note += ("\nOther runs in pst_minilm.jsonl (named as in `benchmarks/glue_minilm.py`: `-w1` = one epoch of "
                 "warm-up and one of cool-down out of 3, `@LR` = learning rate override): "
                 + "; ".join(f"{r['bench_method']} {r['task']} {r['epochs']:g} ep: {_cell(r, r['task'])}" for r in other)
                 + ".\n")
    return "\n".join(lines) + "\n" + note


def plot(rows: list[dict], refs: list[dict], path: Path, tasks=("sst2", "mrpc")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6))
    for ax, t in zip(axes, tasks):
        key = "f1" if t == "mrpc" else "accuracy"
        for fam, label in FAMILIES.items():
            pts = [(s, r["final"][key]) for s in SPARSITIES for r in rows
                   if r["bench_method"] == f"{fam}-{s}" and r["task"] == t and r["epochs"] == 1]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        for ref, style in (("lora", ":"), ("full", "--")):
            r = [x for x in refs if x["bench_method"] == ref and x["task"] == t and x["epochs"] == 1]
            if r:
                ax.axhline(r[-1]["final"][key], ls=style, c="grey", label=f"dense {ref}")
        ax.set(title=f"{t.upper()} ({key})", xlabel="final sparsity (%)", xticks=[50, 70, 90])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS / "pst_minilm"))
    ap.add_argument("--refs", default=str(RESULTS / "glue_minilm.jsonl"))
    ap.add_argument("--out", default=str(RESULTS / "pst_sparsity"), help="table (.md) and plot (.png) path stem")
    ap.add_argument("--runs", default="runs/pst_minilm", help="run folders (for the export columns)")
    args = ap.parse_args(argv)
    res = Path(args.results)
    rows, refs = _rows(res.with_suffix(".jsonl")), _rows(Path(args.refs))
    first_task: dict[str, str] = {}  # export one run per method (its first task in the table's order)
    for r in sorted(rows, key=lambda r: r["task"] != "sst2"):
        first_task.setdefault(r["bench_method"], r["task"])
    keys = [(t, m) for m, t in first_task.items() if m in GRID]
    exports = export_stats(Path(args.runs), res.parent / (res.name + "_export.json"), keys)
    md = to_markdown(rows, refs, exports)
    Path(args.out).with_suffix(".md").write_text(md)
    plot(rows, refs, Path(args.out).with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
