"""LM corpora: Transformer-XL's vocabularies and ids, every source layout, the cache, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from rmt_dist.config import ConfigError, DataConfig, from_flat, validate
from rmt_dist.data import DataError, load_lm_corpus
from rmt_dist.data.sources import file_chunks
from rmt_dist.data.tokenizers import SPLITS, tokenize_words

WORDS = ["the", "of", "a", "<unk>", "cat", "Cat", "dog", "=", "@-@", "ünï", "x", "y", "z"]
# whitespace str.split() honours but file iteration does not break lines at (\u2028, \x1c, \xa0, ...)
SPACES = [" ", " ", " ", "  ", "\t", "\xa0", "\u2028", "\x1c", "\u3000"]


def random_text(rng: np.random.Generator, lines: int, extra_words: tuple[str, ...] = ()) -> str:
    vocab = WORDS + list(extra_words)
    out = []
    for _ in range(lines):
        n = int(rng.integers(0, 8))  # blank lines too
        words = [vocab[i] for i in rng.integers(len(vocab), size=n)]
        seps = [SPACES[i] for i in rng.integers(len(SPACES), size=n + 1)]
        out.append("".join(s + w for s, w in zip(seps, words)) + seps[-1])
    return "\r\n".join(out[:lines // 2]) + "\r\n" + "\n".join(out[lines // 2:])  # no final newline


def write_wikitext(directory: Path, texts: dict[str, str], ext: str = "tokens") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (directory / f"wiki.{split}.{ext}").write_bytes(text.encode("utf-8"))
    return directory


def transformer_xl_reference(files: dict[str, Path]) -> tuple[list[str], dict[str, list[int]]]:
    """Transformer-XL's wt103 path, transcribed (utils/vocabulary.py, data_utils.py), plus <unk> for OOV."""
    counter: Counter[str] = Counter()
    with open(files["train"], encoding="utf-8") as f:
        for line in f:
            counter.update(line.strip().split())
    idx2sym = ["<eos>"]
    for sym, _ in counter.most_common():
        if sym not in idx2sym:
            idx2sym.append(sym)
    if "<unk>" not in idx2sym:
        idx2sym.append("<unk>")
    sym2idx = {s: i for i, s in enumerate(idx2sym)}
    ids = {}
    for split, path in files.items():
        with open(path, encoding="utf-8") as f:
            ids[split] = [sym2idx.get(s, sym2idx["<unk>"]) for line in f for s in line.strip().split() + ["<eos>"]]
    return idx2sym, ids


@pytest.fixture(scope="module")
def wikitext_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    texts = {"train": random_text(rng, 400), "valid": random_text(rng, 60, ("oov1", "oov2")),
             "test": random_text(rng, 60, ("oov3",))}
    return write_wikitext(tmp_path_factory.mktemp("wt") / "wikitext-103", texts)


def test_file_chunks_are_whole_lines_whatever_the_chunk_size(wikitext_like):
    path = wikitext_like / "wiki.train.tokens"
    whole = open(path, encoding="utf-8").read()
    for size in (1, 7, 1000, 1 << 20):
        chunks = list(file_chunks(path, size))
        assert all(c.endswith("\n") for c in chunks)
        assert "".join(chunks) == whole + "\n"  # the missing final newline is added, as line iteration implies


@pytest.mark.parametrize("chunk_chars", [13, 1 << 20])
def test_word_ids_and_vocabulary_match_transformer_xl(wikitext_like, tmp_path, chunk_chars):
    files = {split: wikitext_like / f"wiki.{split}.tokens" for split in SPLITS}
    vocab_size = tokenize_words({s: file_chunks(p, chunk_chars) for s, p in files.items()}, tmp_path)
    symbols, ids = transformer_xl_reference(files)
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines() == symbols
    assert vocab_size == len(symbols)
    for split in SPLITS:
        assert np.load(tmp_path / f"{split}.npy").tolist() == ids[split], split
    train_words = set(open(files["train"], encoding="utf-8").read().split())
    assert "<unk>" in train_words and len(symbols) == len(train_words) + 1  # <eos>, and no second <unk>


def test_wikitext_directory_and_hub_style_parquet_give_the_same_corpus(wikitext_like, tmp_path):
    from_files = load_lm_corpus(DataConfig(dataset="wikitext-103", path=str(wikitext_like),
                                           cache_dir=str(tmp_path / "c1")))
    parquet_dir = tmp_path / "parquet" / "wikitext-103-v1"
    parquet_dir.mkdir(parents=True)
    for split, hub_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
        with open(wikitext_like / f"wiki.{split}.tokens", encoding="utf-8") as f:
            rows = [line if line.strip() else "" for line in f]  # the hub's layout: blank lines are ''
        pq.write_table(pa.table({"text": rows}), parquet_dir / f"{hub_split}-00000-of-00001.parquet")
    from_parquet = load_lm_corpus(DataConfig(dataset="wikitext-103", path=str(parquet_dir.parent),
                                             cache_dir=str(tmp_path / "c2")))
    assert from_parquet.symbols() == from_files.symbols()
    for split in SPLITS:
        assert np.array_equal(getattr(from_parquet, split), getattr(from_files, split))
    assert from_files.metric == "ppl" and from_files.vocab_size == len(from_files.symbols())


def transformer_xl_enwik8_reference(data: bytes) -> tuple[list[str], dict[str, list[int]]]:
    """prep_enwik8.py (the last 2 x 5M bytes are valid/test; bytes written as numbers, newlines as line
    breaks) then Transformer-XL's Vocab over train, valid and test, encoded without <eos>."""
    n = len(data) // 20
    parts = {"train": data[:-2 * n], "valid": data[-2 * n:-n], "test": data[-n:]}
    texts = {s: " ".join(str(c) if c != ord("\n") else "\n" for c in part) for s, part in parts.items()}
    counter: Counter[str] = Counter()
    for split in SPLITS:
        for line in texts[split].splitlines(keepends=True):
            counter.update(line.strip().split())
    idx2sym = [sym for sym, _ in counter.most_common()]
    sym2idx = {s: i for i, s in enumerate(idx2sym)}
    return idx2sym, {s: [sym2idx[t] for line in texts[s].splitlines() for t in line.split()] for s in SPLITS}


def test_enwik8_split_and_byte_vocabulary_match_transformer_xl(tmp_path):
    rng = np.random.default_rng(1)
    text = "".join(rng.choice(list("aaaabbbc \n<>é€"), size=20_000)).encode("utf-8")
    (tmp_path / "enwik8").write_bytes(text)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as z:
        z.writestr("enwik8", text)
    symbols, ids = transformer_xl_enwik8_reference(text)
    for path in ("enwik8", "enwik8.zip"):
        corpus = load_lm_corpus(DataConfig(dataset="enwik8", path=str(tmp_path / path),
                                           cache_dir=str(tmp_path / "cache")))
        assert corpus.metric == "bpc" and corpus.symbols() == symbols and corpus.vocab_size == len(symbols)
        for split in SPLITS:
            assert getattr(corpus, split).tolist() == ids[split], (path, split)
    n = len(text) // 20
    assert len(corpus.test) == len(text[-n:]) - text[-n:].count(b"\n")  # 5% of the file, newlines dropped


def test_raw_wikitext_is_byte_level_like_enwik8(tmp_path):
    texts = {"train": " = Zürich = \n\n Grüße aus Zürich . \n", "valid": " Zürich \n", "test": " ab \n"}
    corpus = load_lm_corpus(DataConfig(dataset="wikitext-103-raw", cache_dir=str(tmp_path / "cache"),
                                       path=str(write_wikitext(tmp_path / "raw", texts, ext="raw"))))
    assert corpus.metric == "bpc" and corpus.vocab_size == len(set(b"".join(t.encode() for t in texts.values())) - {10})
    to_bytes = [int(s) for s in corpus.symbols()]
    for split, text in texts.items():
        assert bytes(to_bytes[i] for i in getattr(corpus, split)) == text.encode().replace(b"\n", b"")


def test_smoke_corpora_ship_with_python_and_are_cached(tmp_path):
    cfg = DataConfig(dataset="smoke", cache_dir=str(tmp_path))
    words = load_lm_corpus(cfg)
    assert not words.cached and words.metric == "ppl" and words.name == "smoke"
    symbols = words.symbols()
    assert symbols[0] == "<eos>" and "<unk>" in symbols and "Python" in symbols
    assert min(len(words.train), len(words.valid), len(words.test)) > 5_000 and len(words.train) > 60_000
    again = load_lm_corpus(cfg)
    assert again.cached and isinstance(again.train, np.memmap) and not again.train.flags.writeable
    assert np.array_equal(again.train, words.train) and again.path == words.path
    chars = load_lm_corpus(DataConfig(dataset="smoke-bytes", cache_dir=str(tmp_path)))
    assert chars.metric == "bpc" and chars.vocab_size < 256
    assert bytes(int(chars.symbols()[i]) for i in chars.valid[:2000]).decode("utf-8").isprintable()


def test_words_unseen_in_training_map_to_an_appended_unk(tmp_path):
    texts = {"train": "a b a\n", "valid": "a zebra\n", "test": "b\n\n"}
    corpus = load_lm_corpus(DataConfig(dataset="wikitext-103", path=str(write_wikitext(tmp_path / "wt", texts)),
                                       cache_dir=str(tmp_path / "cache")))
    assert corpus.symbols() == ["<eos>", "a", "b", "<unk>"]
    assert corpus.train.tolist() == [1, 2, 1, 0] and corpus.valid.tolist() == [1, 3, 0]
    assert corpus.test.tolist() == [2, 0, 0]


def test_changed_source_file_is_tokenized_again(tmp_path):
    texts = {"train": "a b c\nb c\n", "valid": "a b\n", "test": "c\n"}
    cfg = DataConfig(dataset="wikitext-103", path=str(write_wikitext(tmp_path / "wt", texts)),
                     cache_dir=str(tmp_path / "cache"))
    first = load_lm_corpus(cfg)
    write_wikitext(tmp_path / "wt", {"train": "a b c d\nb c\n"})
    second = load_lm_corpus(cfg)
    assert not second.cached and second.path != first.path and "d" in second.symbols()


@pytest.mark.parametrize("texts, message", [
    ({"train": "a\n", "valid": "a\n"}, "lacks wiki.test.tokens"),
    ({"train": "a b\n", "valid": " \n \n", "test": "a\n"}, "the valid split of wikitext-103"),
    ({"train": "", "valid": "a\n", "test": "a\n"}, "the train split of wikitext-103"),
])
def test_incomplete_or_empty_corpus_is_one_clear_line(tmp_path, texts, message):
    path = write_wikitext(tmp_path / "wt", texts)
    with pytest.raises(DataError, match=message) as err:
        load_lm_corpus(DataConfig(dataset="wikitext-103", path=str(path), cache_dir=str(tmp_path / "cache")))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not list((tmp_path / "cache").glob("lm/wikitext-103-*"))  # nothing half-built is cached


@pytest.mark.parametrize("dataset, path, message", [
    ("wikitext-103", "nowhere", "data.path '{tmp}/nowhere' does not exist (expected a directory with "
                                "wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens or parquet"),
    ("wikitext-103-raw", "empty_dir", "holds neither wiki.train.raw, wiki.valid.raw, wiki.test.raw nor parquet"),
    ("enwik8", "nowhere/enwik8", "data.path '{tmp}/nowhere/enwik8' does not exist (expected the enwik8 file"),
    ("enwik8", "", "data.path must be the enwik8 file"),
    ("wikitext-103", "http://example.com/wt103", "data.path must be a local path or s3://bucket/prefix"),
    ("wikitext-2", "", "data.dataset must be one of smoke, smoke-bytes, wikitext-103, wikitext-103-raw, enwik8"),
    ("wikitext-103", "latin1", "wiki.train.tokens' must be UTF-8 text (invalid continuation byte)"),
])
def test_bad_corpus_input_is_one_clear_line(tmp_path, dataset, path, message):
    (tmp_path / "empty_dir").mkdir()
    write_wikitext(tmp_path / "latin1", {"train": "ab", "valid": "a", "test": "a"})
    (tmp_path / "latin1" / "wiki.train.tokens").write_bytes(b"a \xe9t\xe9\n")
    path = str(tmp_path / path) if path and "://" not in path else path
    with pytest.raises(DataError) as err:
        load_lm_corpus(DataConfig(dataset=dataset, path=path, cache_dir=str(tmp_path / "cache")))
    assert message.format(tmp=tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_unwritable_cache_dir_is_one_clear_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DataError, match=r"data.cache_dir must be a writable directory, got '.*file/smoke'"):
        load_lm_corpus(DataConfig(dataset="smoke", cache_dir=str(tmp_path / "file")))


@pytest.mark.parametrize("flat, message", [
    ({"data.dataset": "wikitext-2"}, "data.dataset must be one of smoke, smoke-bytes, wikitext-103"),
    ({"data.dataset": "task", "data.task": "add"}, "data.task must be one of copy, reverse, assoc, quadratic, sort"),
    ({"data.dataset": "enwik8"}, "data.path must be the enwik8 file"),
    ({"data.dataset": "smoke", "data.path": "/x"}, "data.path must be empty for data.dataset=smoke"),
    ({"data.num_train": -1}, "data.num_train must be >= 0 (0 = the paper's size), got -1"),
])
def test_config_validation_rejects_bad_data_keys(flat, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(from_flat(flat))


def test_hub_unreachable_is_one_line_that_points_to_data_path(tmp_path):
    """The real default path (``datasets.load_dataset`` of the hub's wikitext), offline as on this machine."""
    code = ("from rmt_dist.config import DataConfig\nfrom rmt_dist.data import DataError, load_lm_corpus\n"
            f"try:\n    load_lm_corpus(DataConfig(dataset='wikitext-103', cache_dir={str(tmp_path)!r}))\n"
            "except DataError as err:\n    print(err)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    [line] = out.strip().splitlines()
    assert line.startswith("data.dataset=wikitext-103: could not load Salesforce/wikitext (wikitext-103-v1) from "
                           "the Hugging Face hub (") and line.endswith("); set data.path to a local copy")
