"""Tokenizer throughput on WikiText-103-sized text: the whole corpus must tokenize in under 2 minutes.

    python bench/tokenize_corpus.py                 # ~540 MB / ~103M tokens of generated text in a temp dir
    python bench/tokenize_corpus.py --million-tokens 10 --keep /tmp/wt_like

Generates WikiText-103-like text (a 267,735-word vocabulary drawn Zipf-like, one paragraph per line,
blank lines between, ``wiki.{train,valid,test}.tokens``), then times exactly what a first run does:
``load_lm_corpus`` reading the files, building the Transformer-XL word vocabulary, and writing the
memory-mapped arrays into a fresh cache. Generation is not timed.
"""

import os
import sys

# Run as a script, this file's directory heads sys.path, where this "tokenize" would shadow the standard
# library's tokenize module (imported lazily by linecache/inspect): put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from rmt_dist.config import DataConfig  # noqa: E402
from rmt_dist.data import load_lm_corpus  # noqa: E402

VOCAB = 267_735  # WikiText-103's vocabulary, <eos> included
BUDGET_S = 120.0


def make_words(rng: np.random.Generator) -> np.ndarray:
    """Distinct lowercase words; frequent (low-rank) words are short, as in English."""
    words: list[str] = []
    seen: set[str] = set()
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    for rank in range(VOCAB - 1):
        length = 1 + round(np.log(rank + 1) / np.log(7.5))
        while (word := letters[rng.integers(26, size=length)].tobytes().decode()) in seen:
            pass
        seen.add(word)
        words.append(word)
    return np.array(words, dtype=object)


def write_split(path: Path, n_tokens: int, words: np.ndarray, cdf: np.ndarray, rng: np.random.Generator) -> int:
    """Paragraph lines of ~110 words, each followed by a blank line; returns the token count (<eos> included)."""
    tokens = 0
    with open(path, "w", encoding="utf-8") as f:
        while tokens < n_tokens:
            lengths = 1 + rng.poisson(110, size=500)
            ids = np.searchsorted(cdf, rng.random(int(lengths.sum())))
            drawn = words[ids]
            ends = np.cumsum(lengths)
            f.write("".join(f" {' '.join(drawn[e - n:e])} \n \n" for n, e in zip(lengths, ends)))
            tokens += int(lengths.sum()) + 2 * len(lengths)
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--million-tokens", type=float, default=103.0, help="train tokens to generate")
    parser.add_argument("--keep", default="", help="generate into this directory and keep it")
    args = parser.parse_args()

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="rmt_tokenize_bench_"))
    text_dir = workdir / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    words = make_words(rng)
    weights = 1.0 / (np.arange(len(words)) + 2.7)
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    for split, n in (("train", int(args.million_tokens * 1e6)), ("valid", 217_646), ("test", 245_569)):
        write_split(text_dir / f"wiki.{split}.tokens", n, words, cdf, rng)
    size = sum(p.stat().st_size for p in text_dir.iterdir())
    print(f"generated {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s under {text_dir}", flush=True)

    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    corpus = load_lm_corpus(DataConfig(dataset="wikitext-103", path=str(text_dir), cache_dir=str(cache)))
    seconds = time.perf_counter() - t0
    n_tokens = len(corpus.train) + len(corpus.valid) + len(corpus.test)
    verdict = "meets" if seconds < BUDGET_S else "MISSES"
    print(f"tokenized {n_tokens / 1e6:.1f}M tokens ({size / 1e6:.0f} MB, vocabulary {corpus.vocab_size:,}) "
          f"in {seconds:.1f} s: {n_tokens / seconds / 1e6:.2f}M words/s, {size / seconds / 1e6:.1f} MB/s; "
          f"{verdict} the {BUDGET_S:.0f} s budget")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if seconds < BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
