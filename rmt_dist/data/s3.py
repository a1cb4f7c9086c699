"""Staging ``s3://bucket/prefix`` corpora into the local cache with boto3 (once per machine).

The endpoint is ``data.endpoint_url`` or ``$AWS_ENDPOINT_URL`` (MinIO, moto's server), else AWS.
Credentials come from the usual AWS environment/instance profile; error lines are redacted.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from rmt_dist.data.cache import build_once, entry_key
from rmt_dist.data.errors import DataError
from rmt_dist.storage import first_line


def _reason(err: Exception) -> str:
    if isinstance(err, ClientError):
        return err.response.get("Error", {}).get("Code", "ClientError")
    return first_line(err)


def stage(uri: str, root: Path, endpoint_url: str | None) -> Path:
    """The local copy of ``uri``: a file when it names one object, else a directory mirroring the prefix.

    Objects are listed first; the cache entry is keyed by their keys, sizes and ETags, so a changed
    object is downloaded again and an unchanged one never is.
    """
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise DataError(f"data.path must name a bucket (s3://bucket/prefix), got {uri!r}")
    client = boto3.client("s3", endpoint_url=endpoint_url or None)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [o for page in pages for o in page.get("Contents", [])
                   if not o["Key"].endswith("/") and (not prefix or o["Key"] == prefix
                                                      or o["Key"].startswith(prefix + "/"))]
    except (BotoCoreError, ClientError) as err:
        raise DataError(f"data.path {uri!r} could not be listed ({_reason(err)})") from None
    if not objects:
        raise DataError(f"data.path {uri!r} holds no objects (expected the corpus files under this prefix)")
    single = len(objects) == 1 and objects[0]["Key"] == prefix
    names = {o["Key"]: PurePosixPath(o["Key"]).name if single else o["Key"][len(prefix):].lstrip("/")
             for o in objects}
    if any(".." in PurePosixPath(name).parts for name in names.values()):
        raise DataError(f"data.path {uri!r} has object keys with '..' in them; refusing to stage them")

    def download(tmp: Path) -> None:
        for key, name in names.items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(bucket, key, str(dest))
            except (BotoCoreError, ClientError) as err:
                raise DataError(f"data.path {uri!r}: s3://{bucket}/{key} could not be downloaded "
                                f"({_reason(err)})") from None

    digest = entry_key(uri=uri, objects=sorted((o["Key"], o.get("ETag", ""), o["Size"]) for o in objects))
    entry = root / "s3" / f"{bucket}-{digest}"
    build_once(entry, download)
    return entry / names[prefix] if single else entry
