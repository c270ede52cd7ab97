"""The ``peftlab`` command line.

Every subcommand group lives in its own module and is added here in plain sight (no self-registration,
no swallowed ImportError): ``demo`` (demo, methods), ``train`` (train, eval, predict), ``explore``,
``sparse`` (export-sparse), ``plan``, ``serve``. Errors from user input end as one line ``peftlab: error: ...`` and exit 2;
anything else is an internal error (exit 1); ``--debug`` shows the traceback (see :mod:`.boundary`).
"""

from __future__ import annotations

import argparse

from . import demo, explore, plan, serve, sparse, train
from .boundary import call, console_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning of HF transformers.")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    demo.add_commands(sub)
    train.add_commands(sub)
    explore.add_commands(sub)
    sparse.add_commands(sub)
    plan.add_commands(sub)
    serve.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the subcommand
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # positionals after an option (predict RUN --labels a,b "text" ...) belong to the last nargs="*"
        if any(x.startswith("-") for x in extra) or not isinstance(getattr(args, "texts", None), list):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.texts += extra
    with console_logging():
        return call(args.func, args, debug)
