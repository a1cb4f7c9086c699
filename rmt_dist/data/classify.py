"""Long-document classification data (``data.dataset=classify``): documents with ``text`` and ``label``
as samples of segments for a pretrained encoder with memory (the RMT paper's Hyperpartisan setup).

A document is tokenized by the model's tokenizer without special tokens and cut into chunks of
``segment_len - 2`` tokens; each segment is ``[CLS] chunk [SEP]`` (the tokenizer's own, e.g. ``<s>``/``</s>``
for RoBERTa) padded with ``PAD_ID`` to ``segment_len``; a sample is its first ``data.num_segments``
segments (longer documents are truncated, segments past a document's end are all padding and leave its
memory alone). ``labels`` holds the class at the ``[CLS]`` position of every segment the document
reaches; the workload keeps only the last one among the segments it feeds (:func:`last_label_only`),
so the class is predicted from the document's last segment, after the memory has read the rest, and a
curriculum over fewer segments needs no other data.

``data.path``: a ``.jsonl``/``.json``/``.parquet`` file (split 90/10 into train/valid by ``data.seed``), a
directory with ``train.*`` and ``valid.*``/``validation.*``/``dev.*``/``test.*`` files, or a ``datasets``
hub name with ``train`` and ``validation``/``test`` splits. Labels may be strings or integers; the
classes are the training labels, sorted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from rmt_dist.config import DataConfig
from rmt_dist.constants import IGNORE_INDEX, PAD_ID
from rmt_dist.data.cache import build_once, cache_root, entry_key
from rmt_dist.data.errors import DataError
from rmt_dist.data.task_splits import _fixed_rows, _quiet_datasets
from rmt_dist.data.tokenizers import hf_fingerprint

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
VALID_NAMES = ("valid", "validation", "dev", "test")


@dataclass(frozen=True)
class ClassifySplits:
    train: datasets.Dataset  # columns input_ids, labels: int32 [sample_len]
    valid: datasets.Dataset
    classes: list[str]  # class id -> the label as written in the data
    sample_len: int
    path: Path
    cached: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _files(path: Path) -> dict[str, Path] | None:
    """{"train": file, "valid": file} of a directory, {"all": file} of a file; None if not local."""
    if path.is_file():
        if path.suffix not in FORMATS:
            raise DataError(f"data.path must be a .jsonl, .json or .parquet file, got {str(path)!r}")
        return {"all": path}
    if not path.is_dir():
        return None
    found = {p.stem: p for p in sorted(path.iterdir()) if p.suffix in FORMATS}
    valid = next((found[n] for n in VALID_NAMES if n in found), None)
    if "train" not in found or valid is None:
        raise DataError(f"data.path {str(path)!r} must hold train.(jsonl|json|parquet) and one of "
                        f"{', '.join(VALID_NAMES)} in the same format, got {sorted(found)}")
    return {"train": found["train"], "valid": valid}


def _load_raw(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    path = Path(cfg.path).expanduser()
    files = _files(path)
    if files is None:  # a hub dataset
        hub = datasets.load_dataset(cfg.path)
        valid = next((n for n in ("validation", "valid", "dev", "test") if n in hub), None)
        if "train" not in hub or valid is None:
            raise DataError(f"data.path {cfg.path!r} must have a train and a validation or test split, got {list(hub)}")
        train, valid_split = hub["train"], hub[valid]
    elif "all" in files:
        whole = datasets.load_dataset(FORMATS[files["all"].suffix], data_files=str(files["all"]), split="train")
        parts = whole.train_test_split(test_size=0.1, seed=cfg.seed)
        train, valid_split = parts["train"], parts["test"]
    else:
        loaded = datasets.load_dataset(FORMATS[files["train"].suffix], data_files={k: str(v) for k, v in files.items()})
        train, valid_split = loaded["train"], loaded["valid"]
    for name, split in (("train", train), ("valid", valid_split)):
        missing = {"text", "label"} - set(split.column_names)
        if missing or len(split) == 0:
            raise DataError(f"data: the {name} documents of {cfg.path!r} must have text and label columns and at "
                            f"least one row, got columns {split.column_names} and {len(split)} rows")
    return train, valid_split


def _fingerprint(cfg: DataConfig) -> Any:
    path = Path(cfg.path).expanduser()
    files = _files(path)
    if files is None:
        return cfg.path
    return {k: [str(v.resolve()), v.stat().st_size, v.stat().st_mtime_ns] for k, v in files.items()}


def encode_documents(texts: list[str], labels: list[int], tokenizer: Any, segment_len: int,
                     num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels), each [N, num_segments * segment_len] int32, laid out as the module says."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    special = [t for t in (cls, sep) if t is not None]
    content = segment_len - len(special)
    if content < 1:
        raise DataError(f"data.segment_len must be > {len(special)} (the [CLS]/[SEP] tokens), got {segment_len}")
    ids = np.full((len(texts), num_segments * segment_len), PAD_ID, np.int32)
    marks = np.full_like(ids, IGNORE_INDEX)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for i, (tokens, label) in enumerate(zip(encoded, labels)):
        reached = min(num_segments, max(1, -(-len(tokens) // content)))
        for s in range(reached):
            chunk = ([cls] if cls is not None else []) + tokens[s * content:(s + 1) * content] + (
                [sep] if sep is not None else [])
            ids[i, s * segment_len:s * segment_len + len(chunk)] = chunk
            marks[i, s * segment_len] = label
    return ids, marks


def _build(cfg: DataConfig, tokenizer_name: str, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    train, valid = _load_raw(cfg)
    seen = set(train["label"])
    classes = [str(v) for v in sorted(seen)] if all(isinstance(v, int) for v in seen) else sorted(map(str, seen))
    index = {c: i for i, c in enumerate(classes)}
    sample_len = cfg.segment_len * cfg.num_segments
    column = datasets.List(datasets.Value("int32"), length=sample_len)
    features = datasets.Features({"input_ids": column, "labels": column})
    with _quiet_datasets():
        for name, split in (("train", train), ("valid", valid)):
            unknown = {str(v) for v in split["label"]} - set(index)
            if unknown:
                raise DataError(f"data: the {name} documents have labels that training has not: {sorted(unknown)[:5]}")
            ids, marks = encode_documents([str(t) for t in split["text"]], [index[str(v)] for v in split["label"]],
                                          tokenizer, cfg.segment_len, cfg.num_segments)
            datasets.Dataset.from_dict({"input_ids": _fixed_rows(ids), "labels": _fixed_rows(marks)},
                                       features=features).save_to_disk(str(out / name))
    (out / "meta.json").write_text(json.dumps({"classes": classes, "sample_len": sample_len}))


def load_classify_splits(cfg: DataConfig, tokenizer: str) -> ClassifySplits:
    """Train/valid samples of the documents at ``data.path``, tokenized by ``tokenizer`` once and cached."""
    key = entry_key(source=_fingerprint(cfg), tokenizer=hf_fingerprint(tokenizer), segment_len=cfg.segment_len,
                    num_segments=cfg.num_segments, seed=cfg.seed)
    entry = cache_root(cfg.cache_dir) / "classify" / key
    built = build_once(entry, lambda tmp: _build(cfg, tokenizer, tmp))
    meta = json.loads((entry / "meta.json").read_text())
    train, valid = (datasets.load_from_disk(str(entry / split)) for split in ("train", "valid"))
    return ClassifySplits(train=train, valid=valid, classes=meta["classes"], sample_len=meta["sample_len"],
                          path=entry, cached=not built)


def last_label_only(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] labels with every labelled position but the last of each row set to IGNORE_INDEX."""
    marked = labels != IGNORE_INDEX
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    last = torch.where(marked, positions, -1).max(dim=1, keepdim=True).values
    return torch.where(positions == last, labels, torch.full_like(labels, IGNORE_INDEX))
