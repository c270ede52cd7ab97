"""Subcommand ``export-sparse``."""

from __future__ import annotations

import json
from pathlib import Path


def _export_sparse(args) -> int:
    from ..tuners.sparsity import export as sparse
    from .train import load_run

    model, _, _, _ = load_run(Path(args.run_dir), [])
    print(json.dumps(sparse.export_all(model, args.out), indent=2))
    return 0


def add_commands(sub) -> None:
    x = sub.add_parser("export-sparse", help="write a sparsity-trained run (pst, magnitude/movement pruning) as a "
                       "plain HF model folder (OUT/hf) and a compact sparse file (OUT/sparse.safetensors)")
    x.add_argument("run_dir", help="a run directory whose method is a sparsity method")
    x.add_argument("out", help="output folder")
    x.set_defaults(func=_export_sparse)
