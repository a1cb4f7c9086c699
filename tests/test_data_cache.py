"""The cache with real processes: two workers loading at once tokenize once; a builder killed mid-write
leaves nothing a reader could mistake for an entry, and the next builder cleans up after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from conftest import REPO
from rmt_dist.config import DataConfig
from rmt_dist.data import load_lm_corpus
from rmt_dist.data.cache import build_once

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# A worker: waits for the go file, loads the corpus, reports how many times it tokenized (a counting
# wrapper around the real tokenizer) and a digest of what it got.
LOADER = """
import hashlib, json, pathlib, sys, time
import rmt_dist.data.corpus as corpus
from rmt_dist.config import DataConfig
calls = []
real = corpus._tokenize
corpus._tokenize = lambda *args: (calls.append(1), real(*args))[1]
go = pathlib.Path(sys.argv[1])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
c = corpus.load_lm_corpus(DataConfig(dataset="wikitext-103", path=sys.argv[2], cache_dir=sys.argv[3]))
digest = hashlib.sha256(b"".join(getattr(c, s).tobytes() for s in ("train", "valid", "test"))).hexdigest()
print(json.dumps({"tokenized": len(calls), "cached": c.cached, "path": str(c.path), "digest": digest}))
"""

# A builder that dies half-way: writes part of an entry into its temporary directory, then hangs.
DYING_BUILDER = """
import pathlib, sys, time
from rmt_dist.data.cache import build_once
def build(tmp):
    (tmp / "half-written").write_bytes(b"x" * 1000)
    print("building", flush=True)
    time.sleep(600)
build_once(pathlib.Path(sys.argv[1]), build)
"""


def write_corpus(directory: Path, n_words: int = 200_000) -> Path:
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(5000)], dtype=object)
    directory.mkdir(parents=True)
    for split, n in (("train", n_words), ("valid", 5000), ("test", 5000)):
        ids = rng.zipf(1.3, size=n) % len(words)
        lines = [" ".join(words[ids[i:i + 100]]) for i in range(0, n, 100)]
        (directory / f"wiki.{split}.tokens").write_text(" \n".join(lines) + " \n")
    return directory


def test_two_workers_loading_at_once_tokenize_once_and_see_the_same_arrays(tmp_path):
    text = write_corpus(tmp_path / "wt")
    cache, go = tmp_path / "cache", tmp_path / "go"
    workers = [subprocess.Popen([sys.executable, "-c", LOADER, str(go), str(text), str(cache)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for w in workers:
        assert w.stdout.readline().strip() == "ready", w.stderr.read()
    go.touch()  # both start loading the same moment
    results = [json.loads(w.communicate(timeout=120)[0]) for w in workers]
    assert sorted(r["tokenized"] for r in results) == [0, 1]
    assert sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["digest"] == results[1]["digest"] and results[0]["path"] == results[1]["path"]
    entries = [p.name for p in (cache / "lm").iterdir() if not p.name.endswith(".lock")]
    assert entries == [Path(results[0]["path"]).name]  # one complete entry, no temporary left behind
    in_process = load_lm_corpus(DataConfig(dataset="wikitext-103", path=str(text), cache_dir=str(cache)))
    assert in_process.cached and len(in_process.train) == 200_000 + 2000  # words + one <eos> per line


def test_a_builder_killed_mid_write_leaves_no_entry_and_the_next_one_builds_it(tmp_path):
    entry = tmp_path / "cache" / "entry-0123"
    dying = subprocess.Popen([sys.executable, "-c", DYING_BUILDER, str(entry)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert dying.stdout.readline().strip() == "building", dying.stderr.read()
        assert not entry.exists() and len(list(entry.parent.glob(".entry-0123.tmp-*"))) == 1

        built: list[bool] = []
        waiter = threading.Thread(target=lambda: built.append(
            build_once(entry, lambda tmp: (tmp / "complete").write_text("ok"))))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and not entry.exists()  # it waits for the lock holder
    finally:
        dying.send_signal(signal.SIGKILL)
        dying.wait()
    waiter.join(timeout=30)
    assert built == [True]
    assert sorted(p.name for p in entry.iterdir()) == ["complete"]  # nothing of the dead builder's half
    assert not list(entry.parent.glob(".entry-0123.tmp-*"))  # its temporary directory was cleaned up
    assert build_once(entry, lambda tmp: (_ for _ in ()).throw(AssertionError("built twice"))) is False
