"""Subcommand ``serve``: the HTTP server over one base and many adapters (implemented in peftlab.serving)."""

from __future__ import annotations

from ..serving.cli import add_parser


def add_commands(sub) -> None:
    add_parser(sub)
