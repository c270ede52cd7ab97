"""The ``peftlab`` command line. Subcommands register themselves in :data:`COMMANDS`."""

from __future__ import annotations

import argparse
import sys


def _methods(args) -> int:
    from .registry import config_class, methods

    for name in methods():
        doc = (config_class(name).__doc__ or "").strip().splitlines()
        print(f"{name:<12} {config_class(name).__name__:<18} {doc[0] if doc else ''}")
    return 0


def _demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning of HF transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered methods").set_defaults(func=_methods)
    d = sub.add_parser("demo", help="attach LoRA to the packaged MiniLM and train it on a small bundled task")
    d.add_argument("--out", default="runs/demo", help="where to write the demo run")
    d.set_defaults(func=_demo)
    from .serving.cli import add_parser as _serve_parser  # the integrator moves this into the cli package
    _serve_parser(sub)
    for extend in _EXTENSIONS:
        extend(sub)
    return p


_EXTENSIONS: list = []  # functions(subparsers) added by other modules (train, eval, explore ...)


def main(argv: list[str] | None = None) -> int:
    try:
        from . import commands  # noqa: F401  (registers train/eval/predict/explore when present)
    except ImportError:
        pass
    from .explore import cli as _explore_cli  # noqa: F401  (registers `explore`)

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # positionals after an option (predict RUN --labels a,b "text" ...) belong to the last nargs="*"
        if any(x.startswith("-") for x in extra) or not isinstance(getattr(args, "texts", None), list):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.texts += extra
    return int(args.func(args) or 0)


if __name__ == "__main__":  # `python -m peftlab.cli`: run the package's module, where extensions register
    from peftlab.cli import main as _main

    sys.exit(_main())
