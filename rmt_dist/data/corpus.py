"""Language-modelling corpora: tokenized once into the cache, then memory-mapped by every worker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from rmt_dist.config import Config, DataConfig
from rmt_dist.data import sources
from rmt_dist.data.cache import build_once, cache_root, entry_key
from rmt_dist.data.errors import DataError
from rmt_dist.data.tokenizers import SPLITS, hf_fingerprint, tokenize_bytes, tokenize_hf, tokenize_words
from rmt_dist.workload_kinds import DATASETS, validation_metric



@dataclass(frozen=True)
class LMCorpus:
    name: str
    train: np.ndarray  # 1-D token ids, memory-mapped read-only from the cache
    valid: np.ndarray
    test: np.ndarray
    vocab_size: int
    metric: str  # "ppl" (word level, HF tokenizers: per token) or "bpc" (byte level)
    path: Path  # the cache entry: {train,valid,test}.npy, vocab.txt, meta.json
    cached: bool  # True when an earlier run (or another worker) had tokenized it already

    def symbols(self) -> list[str]:
        """The vocabulary, id order (bytes as their decimal value)."""
        return (self.path / "vocab.txt").read_text(encoding="utf-8").splitlines()


def hf_tokenizer(cfg: Config) -> str:
    """The Hugging Face tokenizer an LM corpus is read with: the pretrained model's own (backbone=hf)."""
    return cfg.model.hf_name_or_path if cfg.model.backbone == "hf" else ""


def _text(source: sources.Source, split: str) -> Iterable[str]:
    if hasattr(source, "text"):
        return source.text(split)
    return [source.data(split).decode("utf-8", errors="replace")]  # enwik8: bytes, read as UTF-8 text


def _tokenize(dataset: str, source: sources.Source, out: Path, tokenizer: str) -> None:
    level = DATASETS[dataset].level
    if tokenizer:
        vocab_size = tokenize_hf({split: _text(source, split) for split in SPLITS}, tokenizer, out)
        level = "hf"
    elif level == "word":
        vocab_size = tokenize_words({split: source.text(split) for split in SPLITS}, out)
    else:
        vocab_size = tokenize_bytes({split: source.data(split) for split in SPLITS}, out)
    for split in SPLITS:
        ids = np.load(out / f"{split}.npy", mmap_mode="r")
        if not ids.size or (level == "word" and not ids.any()):  # word level: nothing but <eos> (id 0)
            raise DataError(f"data: the {split} split of {dataset} ({source.describe(split)}) is empty; "
                            f"expected text")
    (out / "meta.json").write_text(json.dumps({"dataset": dataset, "level": level, "vocab_size": vocab_size,
                                               "source": source.fingerprint}))


def load_lm_corpus(data_cfg: DataConfig, tokenizer: str = "") -> LMCorpus:
    """The corpus named by ``data.dataset`` / ``data.path``, tokenized on first use and cached; with
    ``tokenizer`` (a Hugging Face name or directory, see :func:`hf_tokenizer`) by that tokenizer, and
    its metric is per-token perplexity.

    Safe to call from several processes at once: one tokenizes, the others wait and memory-map its result.
    Raises DataError (one line) for an unknown dataset, missing files or an empty split.
    """
    lm = [name for name, kind in DATASETS.items() if kind.workload == "lm"]
    if data_cfg.dataset not in lm:
        raise DataError(f"data.dataset must be one of {', '.join(lm)} for language modelling, got {data_cfg.dataset!r}")
    root = cache_root(data_cfg.cache_dir)
    source = sources.resolve(data_cfg, root)
    level = DATASETS[data_cfg.dataset].level
    key = entry_key(source=source.fingerprint, tokenizer=["hf", hf_fingerprint(tokenizer)] if tokenizer else level)
    entry = root / "lm" / f"{data_cfg.dataset}-{key}"
    built = build_once(entry, lambda tmp: _tokenize(data_cfg.dataset, source, tmp, tokenizer))
    meta = json.loads((entry / "meta.json").read_text())
    train, valid, test = (np.load(entry / f"{split}.npy", mmap_mode="r") for split in SPLITS)
    return LMCorpus(name=data_cfg.dataset, train=train, valid=valid, test=test, vocab_size=meta["vocab_size"],
                    metric=validation_metric(data_cfg.dataset, bool(tokenizer)), path=entry, cached=not built)
