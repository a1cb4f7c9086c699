"""Text -> token ids, the way Transformer-XL prepares the corpora the RMT paper reports on.

Word level (WikiText-103, as Transformer-XL's ``Vocab(special=['<eos>'], lower_case=False)``): each line
is ``line.split()`` plus ``<eos>`` (blank lines too); the vocabulary is ``<eos>`` then the training
words by descending count, ties in order of first appearance (``Counter.most_common``). Valid/test words
missing from it map to ``<unk>``, appended only when training has none (WikiText-103's training split
has it, so its vocabulary keeps Transformer-XL's 267,735 symbols and its perplexities compare).

Byte level (enwik8, as Transformer-XL's enwik8 preparation): every byte is a symbol except the newline,
which that preparation drops; the vocabulary is the bytes seen in train, valid and test by descending
count (204 for enwik8).

Hugging Face (``model.backbone=hf``): the pretrained model's own tokenizer, no special tokens.

All write ``{train,valid,test}.npy`` (the smallest unsigned/int dtype that holds the ids) and
``vocab.txt`` (one symbol per line; bytes as their decimal value) into a directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rmt_dist.constants import SPLITS

EOS, UNK = "<eos>", "<unk>"
NEWLINE = ord("\n")


def _words(chunk: str) -> pa.Array:
    """Transformer-XL's ``line.split() + ['<eos>']`` for every line of ``chunk`` (whole lines, ending in
    \\n). Python splits (Arrow's utf8_split_whitespace was seen to keep a trailing space on non-ASCII
    text); Arrow then hashes the words in C++."""
    return pa.array(chunk.replace("\n", f" {EOS} ").split(), pa.large_string())


def _id_dtype(vocab_size: int) -> type:
    return np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.int32


def _write_vocab(out: Path, symbols: list[str]) -> None:
    (out / "vocab.txt").write_text("".join(f"{s}\n" for s in symbols), encoding="utf-8")


def tokenize_words(splits: Mapping[str, Iterable[str]], out: Path) -> int:
    """Word-level ids of each split (text chunks of whole lines) into ``out``; returns the vocabulary size.

    One pass over train: words get ids in order of first appearance (each chunk dictionary-encoded,
    its new words appended to ``seen``), then are renumbered into vocabulary order by one array lookup.
    """
    seen = pa.array([], pa.large_string())  # distinct training words, in order of first appearance
    parts = []
    for chunk in splits["train"]:
        local = pc.dictionary_encode(_words(chunk))  # the chunk's dictionary is in first-appearance order
        where = pc.index_in(local.dictionary, value_set=seen)
        new = where.is_null().to_numpy(zero_copy_only=False)
        to_seen = np.empty(len(new), np.int64)
        to_seen[~new] = where.drop_null().to_numpy()
        to_seen[new] = len(seen) + np.arange(new.sum())
        seen = pa.concat_arrays([seen, local.dictionary.filter(pa.array(new))])
        parts.append(to_seen[local.indices.to_numpy()].astype(np.int32))
    freq = sum((np.bincount(part, minlength=len(seen)) for part in parts), np.zeros(len(seen), np.int64))
    words = seen.to_pylist()
    order = np.argsort(-freq, kind="stable")  # stable: ties keep first-appearance order (most_common)
    eos = pc.index(seen, EOS).as_py()
    order = order[order != eos]
    symbols = [EOS] + [words[i] for i in order] + ([] if UNK in words else [UNK])
    renumber = np.zeros(len(seen), np.int64)  # <eos> -> 0
    renumber[order] = np.arange(1, len(order) + 1)
    dtype = _id_dtype(len(symbols))

    train = np.lib.format.open_memmap(out / "train.npy", mode="w+", dtype=dtype, shape=(sum(map(len, parts)),))
    offset = 0
    for part in parts:
        train[offset:offset + len(part)] = renumber[part]
        offset += len(part)
    train.flush()
    del train, parts

    vocab = pa.array(symbols, pa.large_string())
    unk = symbols.index(UNK)
    for split in SPLITS[1:]:
        ids = [pc.index_in(_words(chunk), value_set=vocab).fill_null(unk).to_numpy() for chunk in splits[split]]
        np.save(out / f"{split}.npy", np.concatenate(ids or [np.zeros(0, np.int64)]).astype(dtype))
    _write_vocab(out, symbols)
    return len(symbols)


def tokenize_bytes(splits: Mapping[str, bytes], out: Path) -> int:
    """Byte-level ids of each split into ``out``; returns the vocabulary size."""
    arrays = [np.frombuffer(splits[s], np.uint8) for s in SPLITS]
    arrays = [a[a != NEWLINE] for a in arrays]
    counts = sum(np.bincount(a, minlength=256) for a in arrays)
    first = np.full(256, np.iinfo(np.int64).max)  # first position over train, valid, test in that order
    offset = 0
    for a in arrays:
        values, index = np.unique(a, return_index=True)
        first[values] = np.minimum(first[values], index + offset)
        offset += len(a)
    present = np.flatnonzero(counts)
    order = present[np.lexsort((first[present], -counts[present]))]
    to_id = np.zeros(256, np.uint8)
    to_id[order] = np.arange(len(order))
    for split, a in zip(SPLITS, arrays):
        np.save(out / f"{split}.npy", to_id[a])
    _write_vocab(out, [str(b) for b in order])
    return len(order)


def hf_fingerprint(name_or_path: str) -> Any:
    """What identifies a Hugging Face tokenizer for the cache: a local directory's tokenizer files (size,
    mtime), or the hub name."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return name_or_path
    files = sorted(p for p in path.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges", "special")))
    return [str(path.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def tokenize_hf(splits: Mapping[str, Iterable[str]], name_or_path: str, out: Path) -> int:
    """Ids of each split (text chunks of whole lines) with a Hugging Face tokenizer (no special tokens:
    the text is one stream) into ``out``; returns the tokenizer's vocabulary size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    dtype = _id_dtype(len(tokenizer))
    for split in SPLITS:
        parts = []
        for chunk in splits[split]:
            lines = chunk.splitlines(keepends=True)
            for start in range(0, len(lines), 4096):
                encoded = tokenizer(lines[start:start + 4096], add_special_tokens=False)["input_ids"]
                parts.extend(np.asarray(ids, dtype) for ids in encoded if ids)
        np.save(out / f"{split}.npy", np.concatenate(parts or [np.zeros(0, dtype)]))
    symbols = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    _write_vocab(out, [str(s).replace("\n", "\\n") for s in symbols])
    return len(tokenizer)
