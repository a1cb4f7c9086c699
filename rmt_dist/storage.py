"""Where runs keep checkpoints and results: a local directory or ``s3://bucket/prefix``.

A custom S3 endpoint (MinIO, moto's server) comes from ``storage.endpoint_url`` or
``$AWS_ENDPOINT_URL``; credentials come only from the usual AWS environment/instance profile and are
never logged (see :func:`redact`).
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from rmt_dist.config import ConfigError, StorageConfig

_SECRET_PATTERNS = [
    re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),  # AWS access key ids
    re.compile(r"(?i)([\w-]*(?:secret|token|password|passwd|api[_-]?key)[\w-]*)([\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
    re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+(?=@)"),  # user:password@ in URLs
]


def redact(text: str) -> str:
    """``text`` with AWS keys, ``secret=...``-style values and URL passwords replaced by ``***``."""
    text = _SECRET_PATTERNS[0].sub("***", text)
    text = _SECRET_PATTERNS[1].sub(lambda m: m.group(1) + m.group(2) + "***", text)
    return _SECRET_PATTERNS[2].sub("***", text)


def first_line(err: BaseException) -> str:
    """Why something failed, for a one-line message: the error's first line (the rest is where), redacted;
    its type's name if it says nothing."""
    text = str(err).strip()
    return redact(text.splitlines()[0]) if text else type(err).__name__


def whole_line(err: BaseException, limit: int = 600) -> str:
    """An error whose lines all matter (Ray's wrapped worker errors) as one redacted line of at most
    ``limit`` characters; its type's name if it says nothing."""
    return redact(" ".join(str(err).split()))[:limit] or type(err).__name__


def endpoint_url(cfg: StorageConfig) -> str | None:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


@dataclass(frozen=True)
class Storage:
    """A resolved storage location: what Ray's RunConfig takes, plus a printable URI."""

    uri: str  # s3://bucket/prefix or an absolute local path
    filesystem: pafs.FileSystem | None  # None for local paths (Ray uses the local filesystem)
    ray_path: str  # storage_path for RunConfig (no s3:// prefix when a filesystem is given)



def s3_filesystem(endpoint: str | None) -> pafs.S3FileSystem:
    if not endpoint:
        return pafs.S3FileSystem()
    scheme = "https" if endpoint.startswith("https://") else "http"
    return pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[-1], scheme=scheme,
                             region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def resolve(cfg: StorageConfig) -> Storage:
    if cfg.path.startswith("s3://"):
        bucket_path = cfg.path[len("s3://"):].strip("/")
        if not bucket_path:
            raise ConfigError(f"storage.path must name a bucket (s3://bucket/prefix), got {cfg.path!r}")
        return Storage(uri=f"s3://{bucket_path}", filesystem=s3_filesystem(endpoint_url(cfg)), ray_path=bucket_path)
    if "://" in cfg.path:
        raise ConfigError(f"storage.path must be a local directory or s3://bucket/prefix, got {redact(cfg.path)!r}")
    local = str(Path(cfg.path).expanduser().resolve())
    return Storage(uri=local, filesystem=None, ray_path=local)


def check_writable(storage: Storage) -> None:
    """Write and delete a probe file; ConfigError (one line) if the location cannot be written."""
    probe = f".rmt_dist_probe_{uuid.uuid4().hex}"
    try:
        if storage.filesystem is None:
            Path(storage.uri).mkdir(parents=True, exist_ok=True)
            probe_path = Path(storage.uri) / probe
            probe_path.write_bytes(b"ok")
            probe_path.unlink()
        else:
            path = f"{storage.ray_path}/{probe}"
            with storage.filesystem.open_output_stream(path) as f:
                f.write(b"ok")
            storage.filesystem.delete_file(path)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"storage.path must be writable, got {redact(storage.uri)!r} ({first_line(err)})") from None


def read_text(storage: Storage, path: str) -> str | None:
    """The text of the file at ``path`` (a path under ``storage.ray_path``), or None if there is none."""
    fs = storage.filesystem or pafs.LocalFileSystem()
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.readall().decode()


def write_text(storage: Storage, path: str, text: str) -> None:
    """Write ``text`` to ``path`` (a path under ``storage.ray_path``), creating its directory."""
    fs = storage.filesystem or pafs.LocalFileSystem()
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
