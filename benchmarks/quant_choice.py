"""Which library for quantized bases? The candidates on this machine, side by side in one run.

    python benchmarks/quant_choice.py --out benchmarks/results/quant_choice

For one linear of SmolLM2-135M's MLP (576 -> 1536) and tokens = batch 8 x seq 128: bytes of the quantized
weight (with its statistics), the largest dequantization error against the float weight, and the time of a
forward + backward to the input (the frozen-base path of QLoRA training) relative to the float linear,
median of --repeats. A library that is not installed or fails is reported, not skipped silently.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def _time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def candidates(w):
    def bnb(scheme):
        def make():
            import sys as _s
            _s.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
            from peftlab import quant

            q = quant.quantize_linear(w, None, scheme)
            return q, quant.dequantized_weight(q), quant.linear_bytes(torch.nn.Sequential(q))["quantized"]
        return make

    def torchao_nf4():
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

        n = to_nf4(w, block_size=64, scaler_block_size=256)
        nbytes = sum(t.numel() * t.element_size() for t in (n.quantized_data, n.quantized_scalers,
                                                             n.quantization_factor, n.nf4))
        return (lambda x: linear_nf4(x, n)), n.to(torch.float32), nbytes

    def quanto(bits):
        def make():
            from optimum.quanto import qint4, qint8, quantize
            lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
            lin[0].weight.data.copy_(w)
            quantize(lin, weights=qint4 if bits == 4 else qint8)
            from optimum.quanto import freeze
            freeze(lin)
            qw = lin[0].weight
            deq = qw.dequantize().float()
            nbytes = sum(t.numel() * t.element_size() for t in qw.__tensor_flatten__()[0] and
                         [getattr(qw, a) for a in qw.__tensor_flatten__()[0]] if isinstance(t, torch.Tensor))
            return lin, deq, nbytes
        return make

    return {"bitsandbytes nf4": bnb("nf4"), "bitsandbytes int8": bnb("int8"), "torchao nf4": torchao_nf4,
            "optimum-quanto int4": quanto(4), "optimum-quanto int8": quanto(8)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/quant_choice")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    w = torch.randn(1536, 576) * 0.02
    x = torch.randn(8 * 128, 576, requires_grad=True)
    dense = _time(lambda: torch.nn.functional.linear(x, w).sum().backward(), a.repeats)
    rows = [{"library": "float32 (reference)", "bytes": w.numel() * 4, "max_error": 0.0, "fwd_bwd_ratio": 1.0}]
    for name, make in candidates(w).items():
        try:
            fn, deq, nbytes = make()
            t = _time(lambda fn=fn: fn(x).sum().backward(), a.repeats)
            rows.append({"library": name, "bytes": int(nbytes), "max_error": (deq - w).abs().max().item(),
                         "fwd_bwd_ratio": t / dense})
        except Exception as e:  # report what does not work here
            rows.append({"library": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    md = ["| library | bytes (vs fp32) | max dequantization error | fwd+bwd time / fp32 |", "|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['library']} | – | – | fails: {r['error']} |")
        else:
            md.append(f"| {r['library']} | {r['bytes']:,} ({r['bytes'] / rows[0]['bytes']:.3f}) | {r['max_error']:.2e}"
                      f" | {r['fwd_bwd_ratio']:.2f} |")
    cmd = "python benchmarks/quant_choice.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".md").write_text("# Quantized-base library candidates on this CPU\n\n"
                                      f"`{cmd}` (torch {torch.__version__})\n\n" + "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
