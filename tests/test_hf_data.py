"""Classification documents, curriculum, retrieval tasks (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rmt_dist.config import ConfigError, from_flat, validate
from rmt_dist.data import load_task_splits
from rmt_dist.data.classify import IGNORE_INDEX, PAD_ID, last_label_only, load_classify_splits
from rmt_dist.data.errors import DataError
from rmt_dist.data.retrieval import PLACES, min_length, retrieval_sample
from rmt_dist.model import build_model, forward_segments, split_segments
from rmt_dist.train.curriculum import Curriculum
from rmt_dist.train.workloads import ClassifyWorkload, TaskWorkload

from hf_tiny import TEXT, bert_dir


def write_documents(path: Path, n: int, seed: int = 0) -> None:
    """JSONL documents of 1-11 lines of the smoke corpus (1-3 segments of 16); string labels."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            start = int(rng.integers(len(TEXT) - 60))
            text = " ".join(TEXT[start:start + int(rng.integers(1, 12))])
            f.write(json.dumps({"text": text, "label": ["left", "right", "center"][i % 3]}) + "\n")


def classify_config(tmp_path: Path, bert: str, **flat):
    return validate(from_flat({"model.backbone": "hf", "model.hf_name_or_path": bert, "data.dataset": "classify",
                               "data.path": str(tmp_path / "docs.jsonl"), "data.cache_dir": str(tmp_path / "cache"),
                               "data.segment_len": 16, "data.num_segments": 3, "memory.kind": "rmt",
                               "memory.num_tokens": 2, "memory.bptt_unroll": -1, "train.batch_size": 3, **flat}))


def test_documents_become_cls_chunk_sep_segments_labelled_at_the_last_segment(tmp_path):
    bert = bert_dir(tmp_path)
    write_documents(tmp_path / "docs.jsonl", 30)
    cfg = classify_config(tmp_path, bert)
    splits = load_classify_splits(cfg.data, bert)
    assert splits.classes == ["center", "left", "right"] and (len(splits.train), len(splits.valid)) == (27, 3)
    ids = torch.tensor(splits.train["input_ids"]).view(27, 3, 16)
    labels = torch.tensor(splits.train["labels"]).view(27, 3, 16)
    reached = (ids != PAD_ID).any(-1)  # [N, 3]
    assert reached[:, 0].all() and (reached.sum(1) > 1).any() and (reached.sum(1) < 3).any()
    assert ((ids[..., 0] == 2) == reached).all()  # [CLS] opens every reached segment, [SEP] closes it
    assert ((labels[..., 0] != IGNORE_INDEX) == reached).all() and (labels[..., 1:] == IGNORE_INDEX).all()
    flat = last_label_only(labels.view(27, 48))
    assert ((flat != IGNORE_INDEX).sum(1) == 1).all()
    last = reached.long().cumsum(1).argmax(1)  # the last reached segment
    assert ((flat != IGNORE_INDEX).long().argmax(1) // 16 == last).all()
    assert load_classify_splits(cfg.data, bert).cached


def test_classify_accuracy_and_f1_match_one_document_at_a_time(tmp_path):
    bert = bert_dir(tmp_path)
    write_documents(tmp_path / "docs.jsonl", 60)
    cfg = classify_config(tmp_path, bert, **{"train.eval_batches": 0})
    torch.manual_seed(0)
    workload = ClassifyWorkload(cfg, rank=0, world=1, device=torch.device("cpu"))
    model = build_model(cfg, workload.vocab_size).eval()

    def one_at_a_time() -> tuple[np.ndarray, torch.Tensor]:
        truth, logits = [], []
        for row in workload.splits.valid:
            ids, labels = torch.tensor([row["input_ids"]]), last_label_only(torch.tensor([row["labels"]]))
            used = int((ids != PAD_ID).nonzero()[:, 1].max()) // 16 * 16 + 16  # the document alone: no padding segments
            outputs, _ = forward_segments(model, split_segments(ids[:, :used], labels[:, :used], 16))
            logits.append(torch.cat([o.logits for o in outputs], dim=1)[labels[:, :used] != IGNORE_INDEX][0])
            truth.append(int(labels[labels != IGNORE_INDEX]))
        return np.array(truth), torch.stack(logits)

    with torch.no_grad():  # a random model's head prefers one class for every document: centre it
        model.backbone.head[2].bias -= one_at_a_time()[1].mean(0)
        truth, logits = one_at_a_time()
    preds = logits.argmax(-1).numpy()
    loss, n, correct, *counts = workload.evaluate(model)
    assert n == len(truth) == 6 and correct == int((truth == preds).sum())
    f1 = [2 * ((preds == c) & (truth == c)).sum() / max(1, (preds == c).sum() + (truth == c).sum()) for c in range(3)]
    metrics = workload.extra_metrics(counts)
    assert metrics["val_f1"] == pytest.approx(np.mean([f if ((preds == c) | (truth == c)).any() else 1.0
                                                         for c, f in enumerate(f1)]))
    assert len(set(preds)) > 1  # the check has teeth


def test_curriculum_grows_on_schedule_and_on_validation_accuracy():
    steps = Curriculum(from_flat({"train.curriculum": "steps:3,5", "data.num_segments": 3}))
    seen = []
    for step in range(8):
        steps.update(step)
        seen.append(steps.segments)
    assert seen == [1, 1, 1, 2, 2, 3, 3, 3]
    acc = Curriculum(from_flat({"train.curriculum": "acc:0.9", "data.num_segments": 2}))
    assert not acc.update(10) and not acc.update(10, 0.89) and acc.segments == 1
    assert acc.update(20, 0.9) and acc.segments == 2
    assert not acc.update(30, 1.0) and acc.segments == 2  # capped at data.num_segments
    assert Curriculum(from_flat({"data.num_segments": 4})).segments == 4  # off: all segments


@pytest.mark.parametrize("flat, message", [
    ({"train.curriculum": "acc:0.9", "memory.bptt_unroll": 1, "memory.bptt_mode": "sliding"},
     "train.curriculum must be empty unless a step makes one backward call"),
    ({"train.curriculum": "steps:5", "data.task": "copy"}, "train.curriculum must be empty for data.task=copy"),
    ({"train.curriculum": "steps:5,3"}, "train.curriculum must be empty, steps:N1,N2"),
])
def test_curriculum_config_errors(flat, message):
    base = {"data.dataset": "task", "data.task": "retrieval_start", "memory.bptt_unroll": -1}
    with pytest.raises(ConfigError, match=message):
        validate(from_flat({**base, **flat}))


@pytest.mark.parametrize("variant", ["start", "random", "two"])
def test_retrieval_samples_hide_the_facts_in_distractor_text_and_ask_at_the_end(variant):
    rng = np.random.default_rng(0)
    for length in (min_length(variant), 300, 1000):
        text, answer = retrieval_sample(rng, variant, length)
        assert len(text) == length and answer in PLACES
        assert text.endswith("?") and f"went to the {answer}." in text
        went = text.index("went to the")
        if variant == "start":
            assert went < 10
        if variant == "two":
            thing = text.split("where is the ")[1][:-1]
            assert text.index(f"picked up the {thing}.") > went
    starts = [retrieval_sample(rng, "random", 1000)[0].index("went to the") for _ in range(20)]
    assert max(starts) > 300  # random positions, not only the start
    with pytest.raises(DataError, match=f"data.task_length must be >= {min_length(variant)}"):
        retrieval_sample(rng, variant, min_length(variant) - 1)


def test_retrieval_curriculum_stage_is_the_same_task_made_shorter(tmp_path):
    cfg = validate(from_flat({"data.dataset": "task", "data.task": "retrieval_random", "data.task_length": 180,
                              "data.segment_len": 64, "data.num_segments": 3, "data.num_train": 64,
                              "data.num_valid": 8, "data.num_test": 8, "data.cache_dir": str(tmp_path),
                              "memory.bptt_unroll": -1, "train.curriculum": "steps:2", "train.batch_size": 4}))
    workload = TaskWorkload(cfg, rank=0, world=1, device=torch.device("cpu"))
    assert workload.splits.sample_len == 64 and workload.tokens_per_step == 4 * 64
    ids, labels = next(workload._batches)
    assert (labels != -100).sum(1).eq(8).all()  # the answer (padded to 8) is inside the one segment
    workload.curriculum.update(2)
    workload._follow_curriculum()
    assert workload.splits.sample_len == 128 and workload.state_dict()["position"]["segments"] == 2
    assert workload.splits.sample_len == load_task_splits(cfg.data).sample_len - 64


def test_a_sweep_over_classify_long_is_validated_and_prepared_before_ray(tmp_path):
    from rmt_dist.sweep.flags import parse_sweep_args, prepare
    from rmt_dist.sweep.space import trial_config

    bert = bert_dir(tmp_path)
    write_documents(tmp_path / "docs.jsonl", 30)
    spec = parse_sweep_args(["--job", "classify_long", "--search", "memory.num_tokens=0,2",
                             "--model.hf_name_or_path", bert, "--data.path", str(tmp_path / "docs.jsonl"),
                             "--data.cache_dir", str(tmp_path / "cache"), "--storage.path", str(tmp_path / "runs")])
    assert (spec.metric, spec.mode, spec.num_trials) == ("val_acc", "max", 2)
    prepare(spec)  # loads the model's config and tokenizes the documents once
    kinds = [trial_config(spec.base, {"point": p}).memory.kind for p in spec.points]
    assert kinds == ["none", "rmt"] and (tmp_path / "cache" / "classify").is_dir()
