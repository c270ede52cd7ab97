"""The CLI's error boundary: user-input errors become one line on stderr and exit 2.

Data and config loading raise :class:`~peftlab.errors.PeftlabError` naming the file/key/row at the
source. What may still reach the boundary from user input through third-party code (the types in
:data:`USER_INPUT_ERRORS`: OS, decoding, YAML/JSON, regex, safetensors errors ...) is also reported in
one line, exit 2. Any other exception is a bug: ``peftlab: internal error ...`` and exit 1. ``--debug``
re-raises, showing the traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys

import yaml

from ..errors import PeftlabError


def _user_input_errors() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, UnicodeError, ValueError, TypeError, KeyError, IndexError,
                                        yaml.YAMLError, json.JSONDecodeError, re.error]
    try:
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    try:
        # a transformers config field of the wrong type
        from huggingface_hub.errors import StrictDataclassError

        types.append(StrictDataclassError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


USER_INPUT_ERRORS = _user_input_errors()


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, KeyError) and not isinstance(e, PeftlabError):
        text = f"missing key {text}"
    return text[:2000] or type(e).__name__


def call(func, args, debug: bool) -> int:
    try:
        return int(func(args) or 0)
    except PeftlabError as e:
        if debug:
            raise
        print(f"peftlab: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130
    except USER_INPUT_ERRORS as e:
        if debug:
            raise
        print(f"peftlab: error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"peftlab: internal error ({type(e).__name__}: {one_line(e)[:300]}); rerun with --debug "
              "for the traceback and report it", file=sys.stderr)
        return 1


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return f"peftlab: {kind}{record.getMessage()}"


@contextlib.contextmanager
def console_logging():
    """peftlab's INFO lines (new head, inferred classes, progress every train.log_every steps) and warnings
    on stderr (stdout stays for results), for the duration of a command. Errors are printed once, by call()."""
    logger = logging.getLogger("peftlab")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    handler.addFilter(lambda r: r.levelno < logging.ERROR)
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
