"""s3:// corpora through a real S3 endpoint (moto's server on 127.0.0.1): staged once, re-staged when an
object changes, identical to the local files; errors are one line without credentials."""

from __future__ import annotations

import re
from pathlib import Path

import boto3
import numpy as np
import pytest

from conftest import S3_SECRET
from rmt_dist.config import DataConfig
from rmt_dist.data import DataError, load_lm_corpus

TEXTS = {"train": " = T = \n \n the cat sat on the mat . \n the dog sat . \n",
         "valid": " the cat sat . \n", "test": " the mat . \n"}


@pytest.fixture()
def bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def put(s3_server: str, bucket: str, key: str, body: bytes) -> None:
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key=key, Body=body)


def test_wikitext_prefix_is_staged_once_matches_local_and_follows_changes(s3_server, bucket, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    for split, text in TEXTS.items():
        (local / f"wiki.{split}.tokens").write_text(text)
        put(s3_server, bucket, f"corpora/wt103/wiki.{split}.tokens", text.encode())
    put(s3_server, bucket, "corpora/wt103-old/wiki.train.tokens", b"not this one\n")  # same prefix string
    cfg = DataConfig(dataset="wikitext-103", path=f"s3://{bucket}/corpora/wt103", endpoint_url=s3_server,
                     cache_dir=str(tmp_path / "cache"))
    from_s3 = load_lm_corpus(cfg)
    expected = load_lm_corpus(DataConfig(dataset="wikitext-103", path=str(local), cache_dir=str(tmp_path / "c2")))
    assert from_s3.symbols() == expected.symbols()
    for split in ("train", "valid", "test"):
        assert np.array_equal(getattr(from_s3, split), getattr(expected, split))
    [staged] = (tmp_path / "cache" / "s3").glob(f"{bucket}-*")
    assert sorted(p.name for p in staged.iterdir()) == [f"wiki.{s}.tokens" for s in ("test", "train", "valid")]
    mtime = (staged / "wiki.train.tokens").stat().st_mtime_ns

    again = load_lm_corpus(cfg)
    assert again.cached and (staged / "wiki.train.tokens").stat().st_mtime_ns == mtime  # not downloaded again

    put(s3_server, bucket, "corpora/wt103/wiki.train.tokens", (TEXTS["train"] + " a new line \n").encode())
    changed = load_lm_corpus(cfg)
    assert not changed.cached and "new" in changed.symbols() and len(changed.train) == len(from_s3.train) + 4


def test_enwik8_object_with_the_endpoint_from_the_environment(s3_server, bucket, tmp_path, monkeypatch):
    data = bytes(np.random.default_rng(0).integers(32, 127, size=4000, dtype=np.uint8)) + b"\nend"
    (tmp_path / "enwik8").write_bytes(data)
    put(s3_server, bucket, "raw/enwik8", data)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    from_s3 = load_lm_corpus(DataConfig(dataset="enwik8", path=f"s3://{bucket}/raw/enwik8",
                                        cache_dir=str(tmp_path / "cache")))
    expected = load_lm_corpus(DataConfig(dataset="enwik8", path=str(tmp_path / "enwik8"),
                                         cache_dir=str(tmp_path / "c2")))
    assert from_s3.metric == "bpc" and from_s3.symbols() == expected.symbols()
    assert np.array_equal(from_s3.train, expected.train) and np.array_equal(from_s3.test, expected.test)


@pytest.mark.parametrize("path, message", [
    ("s3://no-such-bucket/wt103", "data.path 's3://no-such-bucket/wt103' could not be listed (NoSuchBucket)"),
    ("s3://{bucket}/nothing/here", "data.path 's3://{bucket}/nothing/here' holds no objects (expected the corpus "
                                   "files under this prefix)"),
    ("s3:///wt103", "data.path must name a bucket (s3://bucket/prefix), got 's3:///wt103'"),
])
def test_bad_s3_paths_are_one_line_without_credentials(s3_server, bucket, tmp_path, path, message):
    with pytest.raises(DataError) as err:
        load_lm_corpus(DataConfig(dataset="wikitext-103", path=path.format(bucket=bucket), endpoint_url=s3_server,
                                  cache_dir=str(tmp_path)))
    assert str(err.value) == message.format(bucket=bucket)
    assert S3_SECRET not in str(err.value)
    assert not list(Path(tmp_path).glob("s3/*"))
