"""Same work as peft? Count the aten operators of one training step (forward + backward), ours vs peft's.

    python benchmarks/op_counts.py --cases ln_tuning p_tuning     # -> results/op_counts.{json,md}

A step-time ratio needs a quiet machine and many steps; an operator count does not. Each case of the step
benchmark (``bench_cases.CASES``) is built on MiniLM, stepped once to warm up, then profiled for one step
(batch 8, seq 128). Equal counts per operator mean both libraries do the same work, so a timing gap between
them is the machine's noise, not the method's cost.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).parent / "results"


def count_ops(model, batch) -> collections.Counter:
    from torch.profiler import profile

    model.train()
    model(**batch).loss.backward()  # warm-up (lazy inits)
    with profile() as p:
        model(**batch).loss.backward()
    return collections.Counter({e.key: e.count for e in p.key_averages() if e.key.startswith("aten::")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS / "op_counts"))
    args = ap.parse_args(argv)
    import copy

    import bench_cases

    from peftlab.train.backbones import load_model

    base = load_model("minilm")
    batch = bench_cases.minilm_batch(args.batch, args.seq, seed=0)
    rows = []
    for case in args.cases:
        spec = bench_cases.CASES[case]
        if spec.get("peft") is None:
            raise SystemExit(f"op_counts: case {case!r} has no peft side")
        counts = {}
        for side in ("ours", "peft"):
            torch.manual_seed(0)
            m = spec[side](copy.deepcopy(base))
            counts[side] = count_ops(m, batch)
        keys = sorted(set(counts["ours"]) | set(counts["peft"]))
        diff = {k: (counts["ours"][k], counts["peft"][k]) for k in keys if counts["ours"][k] != counts["peft"][k]}
        heavy = ("aten::mm", "aten::addmm", "aten::bmm")
        rows.append({"case": case, "ours_ops": sum(counts["ours"].values()), "peft_ops": sum(counts["peft"].values()),
                     "ours_matmuls": sum(counts["ours"][k] for k in heavy),
                     "peft_matmuls": sum(counts["peft"][k] for k in heavy), "differing": diff})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"batch": args.batch, "seq": args.seq, "rows": rows}, indent=1))
    lines = [f"aten operators in one training step (forward + backward), MiniLM, batch {args.batch}, seq {args.seq}. "
             f"Command: `python benchmarks/op_counts.py --cases {' '.join(args.cases)}`.", "",
             "| case | ops ours / peft | mm + addmm + bmm ours / peft | operators whose count differs (ours, peft) |",
             "|---|---|---|---|"]
    for r in rows:
        d = ", ".join(f"{k[6:]} {a}/{b}" for k, (a, b) in r["differing"].items()) or "none"
        lines.append(f"| {r['case']} | {r['ours_ops']} / {r['peft_ops']} | {r['ours_matmuls']} / {r['peft_matmuls']} | {d} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
