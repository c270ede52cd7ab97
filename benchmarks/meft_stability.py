"""MEFT numerical stability: reversible gradients vs ordinary autograd, per variant and reversible depth.

For each (model, variant, k): the same model and batch, dropout replayed from the same seed, one
backward with the bottom k blocks reversible and one with k = 0 (ordinary autograd through the same
two-stream model). Reports the smallest per-tensor cosine similarity of the parameter gradients and
the reconstruction error of the embedding output (relative max-abs). fp32 model, fp64 streams
(the default). Random tokens, batch 8 × 128 (MiniLM) / 1 × 128 (SmolLM2), adapters at their init.

    python benchmarks/meft_stability.py            # writes benchmarks/results/meft_stability.{json,md}
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

import peftlab

sys.path.insert(0, str(Path(__file__).parent))
from meft_memory import _load  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GRID = {
    "minilm": [(1, 6), (2, 6), (3, 6), (3, 3), (3, 2)],
    "smollm2-135m": [(1, 30), (1, 16), (1, 12), (1, 8), (2, 30), (2, 12), (2, 8), (3, 4), (3, 2)],
}


def measure(model_name: str, variant: int, k: int) -> dict:
    torch.manual_seed(0)
    model = _load(model_name)
    peftlab.attach(model, peftlab.get_config("meft", variant=variant, reversible_layers=k))
    model.train()
    g = torch.Generator().manual_seed(0)
    if model_name == "minilm":
        ids = torch.randint(1000, 20000, (8, 128), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(8, dtype=torch.long)}
    else:
        ids = torch.randint(100, 20000, (1, 128), generator=g)
        batch = {"input_ids": ids, "labels": ids, "use_cache": False}
    stack = next(m for m in model.peftlab_shared.values() if isinstance(m, peftlab.tuners.meft.MEFTStack))

    def grads(kk: int) -> dict:
        stack.k = kk
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, rev = grads(0), grads(k)
    cos = min(torch.nn.functional.cosine_similarity(ref[n].flatten(), rev[n].flatten(), dim=0).item() for n in ref)
    return {"model": model_name, "variant": variant, "reversible_layers": k, "blocks": len(stack.blocks),
            "min_grad_cosine": cos, "reconstruction_error": stack.last_reconstruction_error}


def main() -> int:
    warnings.simplefilter("ignore", RuntimeWarning)
    rows = []
    for m, grid in GRID.items():
        for v, k in grid:
            rows.append(measure(m, v, k))
            print(json.dumps(rows[-1]), flush=True)
    md = ["| model | variant | reversible blocks | min per-tensor gradient cosine vs autograd | reconstruction error |",
          "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | MEFT{r['variant']} | {r['reversible_layers']} / {r['blocks']} | "
                  f"{r['min_grad_cosine']:.6f} | {r['reconstruction_error']:.1e} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "meft_stability.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "meft_stability.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
