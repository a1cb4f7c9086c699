"""The on-disk cache: tokenized corpora, staged S3 objects and generated task splits.

An entry is a directory whose name carries a digest of everything that determines its content (source,
tokenizer, :data:`CACHE_VERSION`). It is built at most once per machine: under an exclusive lock, so the
second Ray worker on a node waits for the first instead of tokenizing again, and into a temporary
directory that is renamed into place only when complete, so a killed process never leaves a
half-written entry and a reader never sees one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from rmt_dist.data.errors import DataError

CACHE_VERSION = 1  # bump when tokenization or generation changes what an entry holds


def cache_root(cache_dir: str) -> Path:
    """``data.cache_dir``, or ``~/.cache/rmt_dist`` when it is empty."""
    return Path(cache_dir).expanduser().resolve() if cache_dir else Path.home() / ".cache" / "rmt_dist"


def entry_key(**parts: Any) -> str:
    """A short digest of ``parts`` (JSON-serialisable) and the cache version."""
    blob = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path``; yields False where the filesystem has no flock (the
    atomic rename still keeps entries whole there, but builders may then race)."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        except OSError:
            yield False
        else:
            yield True


def build_once(entry: Path, build: Callable[[Path], None]) -> bool:
    """Make sure the directory ``entry`` exists, calling ``build(tmp_dir)`` to fill it if it does not.

    Returns True when this call built the entry, False when it was already there (or another process
    finished it first). An exception from ``build`` propagates and leaves no entry behind.
    """
    if entry.is_dir():
        return False
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.cache_dir must be a writable directory, got {str(entry.parent)!r} "
                        f"({err.strerror or err})") from None
    with _exclusive(entry.parent / f".{entry.name}.lock") as locked:
        if entry.is_dir():
            return False
        if locked:  # then any temporary directory of this entry was left by a builder that died
            for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        try:
            build(tmp)
            os.rename(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if entry.is_dir():  # another host sharing this directory won the rename
                return False
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True
