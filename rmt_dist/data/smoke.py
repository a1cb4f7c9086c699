"""The smoke corpus: the English prose of ``pydoc_data.topics`` (ships with CPython), no download.

Written in WikiText's layout (`` = Title = `` headings, one paragraph per line, blank lines between
articles) as ``wiki.{train,valid,test}.tokens`` (tokenized: punctuation split off, words seen fewer than
3 times replaced by ``<unk>``, as WikiText did) and ``wiki.{split}.raw`` (the same text untokenized),
so it goes through exactly the code paths of WikiText-103 and WikiText-103-raw. Articles are cut into
train/valid/test in order at 80% / 90% of the text.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

from rmt_dist.data.cache import build_once, entry_key
from rmt_dist.data.tokenizers import SPLITS, UNK

SMOKE_VERSION = 1
_TOKEN = re.compile(r"\w+|[^\w\s]")


_RULE = re.compile(r"^\s*([^\w\s])\1+\s*$", re.MULTILINE)  # reST underlines such as ****** or ------


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", _RULE.sub("", text)) if p.strip()]


def _write(topics: dict[str, str], out: Path) -> None:
    articles = [(title, _paragraphs(text)) for title, text in sorted(topics.items())]
    counts = Counter(t for _, paras in articles for p in paras for t in _TOKEN.findall(p))
    total = sum(len(p) for _, paras in articles for p in paras)
    files = {(split, ext): [] for split in SPLITS for ext in ("tokens", "raw")}
    done = 0
    for title, paras in articles:
        split = "train" if done < 0.8 * total else "valid" if done < 0.9 * total else "test"
        done += sum(map(len, paras))
        files[split, "raw"] += [f" = {title} = ", "", *(f" {p} " for p in paras), ""]
        tokenized = [" ".join(t if counts[t] >= 3 else UNK for t in _TOKEN.findall(p)) for p in paras]
        files[split, "tokens"] += [f" = {' '.join(_TOKEN.findall(title))} = ", "", *(f" {p} " for p in tokenized), ""]
    for (split, ext), lines in files.items():
        (out / f"wiki.{split}.{ext}").write_text("\n".join(lines) + "\n", encoding="utf-8")


def smoke_files(root: Path, raw: bool) -> dict[str, Path]:
    """``{split: path}`` of the smoke corpus under the cache ``root``, written on first use."""
    from pydoc_data.topics import topics

    digest = hashlib.sha256(repr(sorted(topics.items())).encode()).hexdigest()
    entry = root / "smoke" / f"pydoc-{entry_key(version=SMOKE_VERSION, topics=digest)}"
    build_once(entry, lambda tmp: _write(topics, tmp))
    return {split: entry / f"wiki.{split}.{'raw' if raw else 'tokens'}" for split in SPLITS}
