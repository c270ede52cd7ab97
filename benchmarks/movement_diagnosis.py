"""Why hard movement pruning collapses in short runs: which weights its ranking prunes, measured.

    python benchmarks/movement_diagnosis.py --steps 250      # -> results/movement_diagnosis.{json,md}

MiniLM with ``movement_prune`` attached trains densely (sparsity 0, the schedule's warm-up) on SST-2's 8k
subset for ``--steps`` steps at the movement rows' settings (AdamW, lr 5e-5, batch 32). Then, with no more
training, each linear is pruned to sparsity s by four rankings and the dev set is scored:
  * movement (Adam): the learned scores S, as the method uses them (Sanh et al. eq. 6 through Adam);
  * movement (raw eq. 6): S = −Σ_t W'_t ⊙ ∂ℒ/∂W'_t accumulated beside the run (plain SGD on S);
  * magnitude |W'|, and a seeded random ranking.
It also reports, per ranking, the share of its pruned entries that magnitude pruning prunes too (a random
ranking's share is s) and the share of |W'|² it removes (the energy of the pruned weights).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--sparsities", type=float, nargs="*", default=[0.1, 0.25, 0.5])
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--out", default=str(RESULTS / "movement_diagnosis"))
    args = ap.parse_args(argv)

    import peftlab
    from peftlab.core import part_adapters
    from peftlab.train import loop
    from peftlab.train.config import load_config
    from peftlab.train.data import collate, encode_classification, load_task

    torch.manual_seed(42)
    cfg = load_config({"model": "minilm", "method": "movement_prune", "method_args": {"final_sparsity": 0.5},
                       "task": {"name": "sst2", "train_limit": 8000},
                       "train": {"epochs": 1, "batch_size": 32, "lr": args.lr, "max_length": 128, "seed": 42,
                                 "progress": False}, "output_dir": "runs/movement_diagnosis"})
    data = load_task(cfg)
    model, tok = loop.build_model(cfg, data)
    layers = [(n, a, model.get_submodule(n)) for n, a in part_adapters(model, "default")]
    raw = {n: torch.zeros_like(a.scores) for n, a, _ in layers}
    opt = torch.optim.AdamW(peftlab.param_groups(model, lr=args.lr))
    items = encode_classification(tok, data.train, cfg.train.max_length)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(42)).tolist()
    model.train()
    for step in range(args.steps):
        idx = [perm[(step * 32 + j) % len(perm)] for j in range(32)]
        loss = model(**collate([items[i] for i in idx], tok.pad_token_id)).loss
        loss.backward()
        for n, a, _ in layers:
            raw[n] -= a.scores.grad  # ∂ℒ/∂S = ∂ℒ/∂(M⊙W') ⊙ W', so this is −Σ W'·∂ℒ/∂W' (eq. 6)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    learned = {n: a.scores.detach().clone() for n, a, _ in layers}
    weights = {n: (s.weight_oi().float() + a.delta).detach() for n, a, s in layers}
    gen = torch.Generator().manual_seed(0)
    rankings = {"movement (Adam, as trained)": learned, "movement (raw eq. 6)": raw,
                "magnitude ‖W'‖": {n: w.abs() for n, w in weights.items()},
                "random": {n: torch.rand(w.shape, generator=gen) for n, w in weights.items()}}
    from peftlab.tuners.sparsity.base import top_mask

    rows = [{"ranking": "dense (s = 0)", "sparsity": 0.0, **loop.evaluate(model, tok, data, cfg)}]
    print(rows[-1], flush=True)
    for s in args.sparsities:
        mag_pruned = {n: top_mask(w.abs(), s) == 0 for n, w in weights.items()}
        for name, scores in rankings.items():
            shared = energy = total_pruned = 0.0
            for n, a, _ in layers:
                pruned = top_mask(scores[n], s) == 0
                shared += float((pruned & mag_pruned[n]).sum())
                total_pruned += float(pruned.sum())
                energy += float((weights[n][pruned] ** 2).sum()) / float((weights[n] ** 2).sum()) / len(layers)
                a.scores.data.copy_(scores[n])
                a.sparsity.fill_(s)
            r = {"ranking": name, "sparsity": s, **loop.evaluate(model, tok, data, cfg),
                 "pruned_also_by_magnitude": shared / max(total_pruned, 1), "energy_removed": energy}
            rows.append(r)
            print(r, flush=True)
    for n, a, _ in layers:
        a.scores.data.copy_(learned[n])
        a.sparsity.fill_(0.0)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"steps": args.steps, "lr": args.lr, "rows": rows}, indent=1))
    lines = [f"After {args.steps} dense steps (MiniLM, SST-2 8k, AdamW lr {args.lr:g}, batch 32), each linear pruned "
             "to sparsity s by a ranking, no further training; SST-2 dev accuracy (majority class 0.509).", "",
             "| s | ranking | dev accuracy | pruned entries also pruned by magnitude | share of ‖W'‖² removed (mean over layers) |",
             "|---|---|---|---|---|"]
    for r in rows:
        both = r.get("pruned_also_by_magnitude")
        lines.append(f"| {r['sparsity']:g} | {r['ranking']} | {r['accuracy']:.3f} | "
                     + (f"{both:.3f} | {r['energy_removed']:.4f} |" if both is not None else "— | — |"))
    lines += ["", f"Command: `python benchmarks/movement_diagnosis.py --steps {args.steps}`. A random ranking prunes "
              "a share s of magnitude's pruned entries by chance."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(math.isfinite(r["accuracy"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
