"""Filesystem safety for run directories: the one deletion helper, atomic writes, the run lock.

Every ``rmtree``/``unlink`` of the application goes through :func:`remove`, which resolves the path
and refuses anything that is not strictly inside the directory it is meant to stay in (symlinks are
not followed: a link is removed, never its target). Files a run publishes are written to a temporary
sibling and renamed (:func:`write_text`, :func:`swap_dir`), so a kill leaves the old or the new
version. :func:`lock_run` takes an exclusive ``fcntl.flock`` on ``RUN/.lock`` for the process'
lifetime: the kernel releases it when the process exits or is killed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..errors import RunLockedError, UnsafePathError

LOCK_NAME = ".lock"


def _inside(path: Path, root: Path) -> Path:
    root_r = Path(root).resolve()
    p = Path(path)
    target = p.parent.resolve() / p.name  # resolve the parents only: the last component may be a link
    if p.name in ("", ".", "..") or target == root_r or root_r not in target.parents:
        raise UnsafePathError(f"refusing to touch {p}: it is not inside {root_r}")
    return target


def remove(path: str | Path, root: str | Path) -> None:
    """Delete ``path`` (file, link or directory tree) if it exists, only if it lies strictly inside ``root``."""
    target = _inside(Path(path), Path(root))
    if target.is_symlink() or target.is_file():
        target.unlink(missing_ok=True)
    elif target.is_dir():
        shutil.rmtree(target)


def write_text(path: str | Path, text: str) -> None:
    """Write ``path`` atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def swap_dir(tmp: Path, final: Path, root: Path) -> None:
    """Publish the finished directory ``tmp`` as ``final`` (both inside ``root``): a kill mid-swap leaves
    ``final`` or ``final.old`` complete."""
    old = final.with_name(final.name + ".old")
    remove(old, root)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    remove(old, root)


def read_text(path: str | Path, what: str, error: type[Exception]) -> str:
    """A UTF-8 text file (BOM stripped); ``error`` naming the file (and line) if missing, binary or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise error(f"{path}: line {line}: not UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    if "\x00" in text:
        raise error(f"{path}: a binary file, not a text {what}")
    return text


def slug(name: object) -> str:
    """A safe single path component for ``name``: letters, digits, ``.``, ``_``, ``-`` (never ``.``/``..``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-")
    return s[:80] or "unnamed"


def lock_run(run_dir: str | Path):
    """Take the run directory's exclusive lock (non-blocking); returns the open file that holds it.

    Raises :class:`RunLockedError` naming the holder's pid when another process holds it."""
    import fcntl

    run_dir = Path(run_dir)
    f = open(run_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise RunLockedError(f"{run_dir} is in use by another peftlab process (pid {holder}); "
                             "wait for it to finish or pick another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def unlock_run(handle) -> None:
    if handle is not None and not handle.closed:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


RUN_ARTIFACTS = ("config.json", "train.log", "metrics.jsonl", "results.json", "checkpoint", "checkpoint.old",
                 "checkpoint.tmp", "best", "best.old", "best.tmp")


def clear_run(run_dir: str | Path) -> None:
    """Remove what a previous run wrote into ``run_dir`` (the names in :data:`RUN_ARTIFACTS`), nothing else."""
    for name in RUN_ARTIFACTS:
        remove(Path(run_dir) / name, run_dir)
