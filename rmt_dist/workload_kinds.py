"""What each ``data.dataset`` is: one table that validation, the driver, the worker's workload, sweeps and
export ask, instead of each deciding by name.

A dataset belongs to one workload: ``lm`` (Transformer-XL-style streams; memory carried across steps,
perplexity or bits per character), ``task`` (the paper's algorithmic tasks: samples of K segments,
memory reset per sample, accuracy) or ``classify`` (long documents with a pretrained encoder, accuracy
and macro F1). The classes that train them are ``rmt_dist.train.workloads.WORKLOADS``.

No torch here: ``config.py`` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetKind:
    name: str
    workload: str  # lm | task | classify
    metric: str  # ppl | bpc | acc: the validation figure (an LM read with a Hugging Face tokenizer: ppl per token)
    level: str = ""  # LM corpora with the built-in tokenizers: word | byte
    path: str = "optional"  # data.path: none (ships with Python) | optional (else the default source) | required
    path_rule: str = ""  # what data.path must be, when required
    backbone: str = ""  # the model.backbone it needs, if one
    backbone_rule: str = ""

    @property
    def samples(self) -> bool:
        """Samples of segments with memory reset per sample (else LM streams, memory carried)."""
        return self.workload != "lm"


DATASETS: dict[str, DatasetKind] = {d.name: d for d in (
    DatasetKind("smoke", "lm", "ppl", level="word", path="none"),
    DatasetKind("smoke-bytes", "lm", "bpc", level="byte", path="none"),
    DatasetKind("wikitext-103", "lm", "ppl", level="word"),
    DatasetKind("wikitext-103-raw", "lm", "bpc", level="byte"),
    DatasetKind("enwik8", "lm", "bpc", level="byte", path="required",
                path_rule="the enwik8 file (a local path or s3://bucket/key)"),
    DatasetKind("task", "task", "acc", backbone="builtin",
                backbone_rule="task vocabularies are characters, not a pretrained tokenizer's"),
    DatasetKind("classify", "classify", "acc", path="required",
                path_rule="a JSONL/parquet file or directory (text, label) or a datasets hub name",
                backbone="hf", backbone_rule="a pretrained encoder"),
)}

# data.task for data.dataset=task (the generators: rmt_dist/data/tasks.py)
TASKS = ("copy", "reverse", "assoc", "quadratic", "sort", "retrieval_start", "retrieval_random", "retrieval_two")


def dataset_kind(name: str) -> DatasetKind:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"data.dataset must be one of {', '.join(DATASETS)}, got {name!r}") from None


def sample_datasets() -> tuple[str, ...]:
    return tuple(name for name, d in DATASETS.items() if d.samples)


def validation_metric(dataset: str, hf_tokenizer: bool = False) -> str:
    """What a run of ``dataset`` is judged by: ppl | bpc | acc (``train.metrics.PRIMARY`` names it)."""
    kind = dataset_kind(dataset)
    return "ppl" if kind.workload == "lm" and hf_tokenizer else kind.metric
