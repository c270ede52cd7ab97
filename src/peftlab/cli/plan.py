"""Subcommand ``plan``: the memory a run will need, before it runs (:func:`peftlab.planner.plan`)."""

from __future__ import annotations

import json


def _plan(args) -> int:
    from ..planner import parse_bytes
    from ..train.config import load_config
    from ..train.planning import plan_run

    cfg = load_config(args.config, args.overrides)
    budget = parse_bytes(args.budget) if args.budget is not None else None
    cfg, p = plan_run(cfg, args.batch, args.seq)
    batch, seq = p.batch_size, p.seq_len
    if args.json:
        d = p.to_dict()
        if budget is not None:
            d.update(budget=budget, max_batch=p.max_batch(budget))
        print(json.dumps(d, indent=2))
    else:
        print(f"{cfg.model} / {cfg.method} / batch {batch} / seq {seq}")
        print(p.table(budget))
    return 0


def add_commands(sub) -> None:
    x = sub.add_parser("plan", help="predict a run's peak training memory (weights, gradients, optimizer state, "
                       "activations) and the largest batch within --budget, before training")
    x.add_argument("config", help="a run's YAML config (as for `peftlab train`)")
    x.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    x.add_argument("--budget", help="a memory budget such as 8GiB or 512MB: report the largest batch that fits")
    x.add_argument("--batch", type=int, help="batch size (default: train.batch_size)")
    x.add_argument("--seq", type=int, help="sequence length (default: train.max_length)")
    x.add_argument("--json", action="store_true", help="print the plan as JSON")
    x.set_defaults(func=_plan)
