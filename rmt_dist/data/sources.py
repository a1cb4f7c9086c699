"""Where a corpus's train/valid/test text comes from: local files, parquet, the Hugging Face hub, S3.

A source yields each split as text chunks of whole lines (word-level tokenization) or as bytes
(byte-level), and carries a fingerprint of its content's identity for the cache key. Nothing is read
until the tokenizer asks, so a cache hit never touches the network or the files.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from rmt_dist.config import DataConfig
from rmt_dist.data import s3
from rmt_dist.data.errors import DataError
from rmt_dist.data.smoke import smoke_files
from rmt_dist.data.tokenizers import SPLITS
from rmt_dist.storage import first_line, redact

HUB_NAME = "Salesforce/wikitext"
HUB_CONFIGS = {"wikitext-103": "wikitext-103-v1", "wikitext-103-raw": "wikitext-103-raw-v1"}
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
_CHUNK_CHARS = 1 << 24


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def file_chunks(path: Path, chunk_chars: int = _CHUNK_CHARS) -> Iterator[str]:
    """The file as chunks of about ``chunk_chars`` characters, each ending at a line end (universal
    newlines, as Python reads text files for Transformer-XL)."""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(chunk_chars):
                chunk += f.readline()
                yield chunk if chunk.endswith("\n") else chunk + "\n"
    except UnicodeDecodeError as err:
        raise DataError(f"data: {str(path)!r} must be UTF-8 text ({err.reason})") from None


def rows_to_text(rows: list[str]) -> str:
    """Rows of the hub's ``text`` column (one per line of the original file, with or without its
    newline; blank lines are ``''``) back into whole lines."""
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows)


@dataclass(frozen=True)
class FileSource:
    """One text file per split (``wiki.train.tokens`` ...)."""

    files: dict[str, Path]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {split: _stat(path) for split, path in self.files.items()}

    def describe(self, split: str) -> str:
        return str(self.files[split])

    def text(self, split: str) -> Iterator[str]:
        return file_chunks(self.files[split])

    def data(self, split: str) -> bytes:
        return self.files[split].read_bytes()


@dataclass
class TableSource:
    """A ``datasets.DatasetDict`` with a ``text`` column, one row per line: the hub's wikitext or local
    parquet files in its layout. ``load`` runs on first read only."""

    load: Callable[[], Any]
    fingerprint: dict[str, Any]
    label: str

    @cached_property
    def _tables(self) -> Any:
        return self.load()

    def describe(self, split: str) -> str:
        return f"{self.label} {HUB_SPLITS[split]}"

    def text(self, split: str) -> Iterator[str]:
        table = self._tables[HUB_SPLITS[split]]
        if "text" not in table.column_names:
            raise DataError(f"data: {self.describe(split)} must have a 'text' column, got {table.column_names}")
        for batch in table.iter(batch_size=100_000):
            yield rows_to_text(batch["text"])

    def data(self, split: str) -> bytes:
        return "".join(self.text(split)).encode("utf-8")


@dataclass(frozen=True)
class Enwik8Source:
    """The raw enwik8 file (or ``enwik8.zip``): the last 2 x 5% are valid and test (5M bytes each of the
    100M, as Transformer-XL's preparation), the rest train."""

    path: Path

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {"enwik8": _stat(self.path)}

    def describe(self, split: str) -> str:
        return f"{self.path} ({split} part)"

    @cached_property
    def _bytes(self) -> bytes:
        if self.path.suffix != ".zip":
            return self.path.read_bytes()
        with zipfile.ZipFile(self.path) as z:
            if "enwik8" not in z.namelist():
                raise DataError(f"data.path {str(self.path)!r} must contain a member 'enwik8', got {z.namelist()}")
            return z.read("enwik8")

    def data(self, split: str) -> bytes:
        raw = self._bytes
        n = len(raw) // 20
        cuts = {"train": (0, len(raw) - 2 * n), "valid": (len(raw) - 2 * n, len(raw) - n), "test": (len(raw) - n, None)}
        start, end = cuts[split]
        return raw[start:end]


Source = FileSource | TableSource | Enwik8Source
_WIKITEXT_FILES = "wiki.train.{e}, wiki.valid.{e}, wiki.test.{e}"


def _hub(dataset: str, root: Path) -> TableSource:
    config = HUB_CONFIGS[dataset]

    def load() -> Any:
        import datasets

        try:
            return datasets.load_dataset(HUB_NAME, config, cache_dir=str(root / "hf"))
        except Exception as err:  # no network, hub outage, auth: one line, then the way around it
            raise DataError(f"data.dataset={dataset}: could not load {HUB_NAME} ({config}) from the Hugging Face "
                            f"hub ({first_line(err)}); set data.path to a local copy") from None

    return TableSource(load=load, fingerprint={"hub": HUB_NAME, "config": config}, label=f"{HUB_NAME} {config}")


def _parquet(files: dict[str, list[Path]], root: Path) -> TableSource:
    def load() -> Any:
        import datasets

        data_files = {HUB_SPLITS[s]: [str(p) for p in paths] for s, paths in files.items()}
        return datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(root / "hf"))

    return TableSource(load=load, fingerprint={s: [_stat(p) for p in paths] for s, paths in files.items()},
                       label=str(files["train"][0].parent))


def _wikitext_dir(path: Path, raw: bool, root: Path) -> Source:
    ext = "raw" if raw else "tokens"
    expected = f"a directory with {_WIKITEXT_FILES.format(e=ext)} or parquet files with a text column"
    if not path.exists():
        raise DataError(f"data.path {str(path)!r} does not exist (expected {expected})")
    if not path.is_dir():
        raise DataError(f"data.path {str(path)!r} must be {expected}")
    files = {split: path / f"wiki.{split}.{ext}" for split in SPLITS}
    if any(p.exists() for p in files.values()):
        missing = [p.name for p in files.values() if not p.exists()]
        if missing:
            raise DataError(f"data.path {str(path)!r} lacks {', '.join(missing)} (expected {expected})")
        return FileSource(files)
    parquet = sorted(path.rglob("*.parquet"))
    by_split = {split: [p for p in parquet if split in p.name] for split in SPLITS}
    if parquet and all(by_split.values()):
        return _parquet(by_split, root)
    raise DataError(f"data.path {str(path)!r} holds neither {_WIKITEXT_FILES.format(e=ext)} nor parquet files "
                    f"named by split (train/valid/test)")


def _enwik8(path: Path) -> Enwik8Source:
    if path.is_dir():
        path = next((path / n for n in ("enwik8", "enwik8.zip") if (path / n).is_file()), path / "enwik8")
    if not path.is_file():
        raise DataError(f"data.path {str(path)!r} does not exist (expected the enwik8 file or enwik8.zip)")
    return Enwik8Source(path)


def resolve(cfg: DataConfig, root: Path) -> Source:
    """The source named by ``data.dataset`` and ``data.path`` (staging s3:// into the cache first)."""
    if cfg.dataset in ("smoke", "smoke-bytes"):
        return FileSource(smoke_files(root, raw=cfg.dataset == "smoke-bytes"))
    if not cfg.path:
        if cfg.dataset == "enwik8":
            raise DataError("data.path must be the enwik8 file (a local path or s3://bucket/key) for "
                            "data.dataset=enwik8, got ''")
        return _hub(cfg.dataset, root)
    if cfg.path.startswith("s3://"):
        local = s3.stage(cfg.path, root, cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    elif "://" in cfg.path:
        raise DataError(f"data.path must be a local path or s3://bucket/prefix, got {redact(cfg.path)!r}")
    else:
        local = Path(cfg.path).expanduser().resolve()
    if cfg.dataset == "enwik8":
        return _enwik8(local)
    return _wikitext_dir(local, raw=cfg.dataset.endswith("-raw"), root=root)
