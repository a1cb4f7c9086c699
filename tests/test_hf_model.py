"""model.backbone=hf: tiny random GPT-2 and BERT behind MemoryModel (plain PyTorch, no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import rmt_dist
from rmt_dist.config import ConfigError, from_flat, validate
from rmt_dist.model import (PAD_ID, build_model, forward_segments, from_pretrained, save_pretrained,
                            split_segments, train_segments)

from hf_tiny import bert_dir, gpt2_dir, llama_dir


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> str:
    return gpt2_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return llama_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return bert_dir(tmp_path_factory.mktemp("hf"))


def hf_model(path: str, kind: str = "rmt", num_tokens: int = 3, classes: int = 0, **flat: Any):
    cfg = from_flat({"model.backbone": "hf", "model.hf_name_or_path": path, "memory.kind": kind,
                     "memory.num_tokens": num_tokens, **flat})
    return build_model(validate(cfg), classes).eval(), cfg


@pytest.mark.parametrize("kind", ["none", "memtr"])
def test_zero_memory_tokens_one_segment_equals_bare_hf_model(gpt2, llama, bert, kind):
    from transformers import AutoModel, AutoModelForCausalLM

    ids = torch.randint(1, 300, (2, 12))
    for path in (gpt2, llama):
        model, _ = hf_model(path, kind, num_tokens=0)
        out = model(ids, ids, model.init_state())
        bare = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.testing.assert_close(out.logits, bare(input_ids=ids).logits, rtol=0, atol=0)

    model, _ = hf_model(bert, kind, num_tokens=0, classes=2)
    h, _ = model.backbone(model.backbone.embed_tokens(ids))
    torch.testing.assert_close(h, AutoModel.from_pretrained(bert).eval()(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    # and MemoryModel's logits are the head over exactly those states
    torch.testing.assert_close(model(ids, None, model.init_state()).logits, model.backbone.logits(h))


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_causal_rmt_has_no_leakage_within_or_across_segments(gpt2, llama, which):
    model, _ = hf_model(gpt2 if which == "gpt2" else llama, "rmt", num_tokens=3)
    ids = torch.randint(1, 300, (1, 16))
    outputs, _ = forward_segments(model, split_segments(ids, ids, 8))
    base = torch.cat([o.logits for o in outputs], dim=1)  # [1, 16, V]
    for p in range(16):
        changed = ids.clone()
        changed[0, p] = (changed[0, p] + 7) % 300
        outputs, _ = forward_segments(model, split_segments(changed, changed, 8))
        logits = torch.cat([o.logits for o in outputs], dim=1)
        torch.testing.assert_close(logits[:, :p], base[:, :p], rtol=0, atol=0, msg=f"position {p} leaked backwards")
        assert not torch.allclose(logits[:, p], base[:, p]), p  # the comparison can fail


@pytest.mark.parametrize("which", ["gpt2", "bert"])
def test_memory_carries_information_to_the_next_segment(gpt2, bert, which):
    path, classes = (gpt2, 0) if which == "gpt2" else (bert, 2)
    a = torch.randint(1, 300, (2, 8))
    b = torch.randint(1, 300, (2, 8))
    second = torch.randint(1, 300, (2, 8))
    for kind, carries in (("rmt", True), ("none", False)):
        model, _ = hf_model(path, kind, classes=classes)
        out_a = forward_segments(model, [(a, None), (second, None)])[0][1].logits
        out_b = forward_segments(model, [(b, None), (second, None)])[0][1].logits
        assert (not torch.equal(out_a, out_b)) == carries, kind
    # and gradients reach the first segment's tokens through memory
    model, _ = hf_model(path, "rmt", classes=classes)
    emb = model.backbone.hf.get_input_embeddings().weight
    labels = second.clone() if classes == 0 else torch.where(torch.arange(8) == 0, 1, -100).expand(2, 8)
    first_only = torch.zeros_like(emb, dtype=torch.bool)
    first_only[a.unique()] = True
    first_only[second.unique()] = False
    loss = forward_segments(model, [(a, torch.full_like(a, -100)), (second, labels)])[0][1].loss_sum
    loss.backward()
    assert emb.grad[first_only].abs().sum() > 0


@pytest.mark.parametrize("which", ["gpt2", "llama", "bert"])
def test_padding_never_changes_a_samples_memory_and_empty_segments_keep_it(gpt2, llama, bert, which):
    path, classes = {"gpt2": (gpt2, 0), "llama": (llama, 0), "bert": (bert, 2)}[which]
    model, _ = hf_model(path, "rmt", classes=classes)
    model.padded_inputs = True  # encoders pad by default; a causal LM is told its inputs may be padded
    long, short = torch.randint(1, 300, (1, 24)), torch.randint(1, 300, (1, 9))
    batch = torch.cat([long, torch.cat([short, torch.full((1, 15), PAD_ID)], dim=1)])  # segments 8: short ends in seg 2
    batch_out, batch_state = forward_segments(model, [(s, None) for s in batch.split(8, dim=1)])
    alone_out, alone_state = forward_segments(model, [(s, None) for s in short.split(8, dim=1)])  # 8 and 1
    assert len(batch_out) == 3 and len(alone_out) == 2
    torch.testing.assert_close(batch_out[0].state.memory[1:], alone_out[0].state.memory[0:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch_out[1].state.memory[1:], alone_state.memory, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch_out[1].logits[1:, :1], alone_out[1].logits, rtol=1e-5, atol=1e-6)
    # the third segment is all padding for the short sample: its memory is exactly what it was
    torch.testing.assert_close(batch_state.memory[1:], batch_out[1].state.memory[1:], rtol=0, atol=0)
    assert not torch.allclose(batch_state.memory[:1], batch_out[1].state.memory[:1])  # the long one moved on
    # the long sample is unaffected by its neighbour's padding
    long_out, _ = forward_segments(model, [(s, None) for s in long.split(8, dim=1)])
    torch.testing.assert_close(batch_out[2].logits[:1], long_out[2].logits, rtol=1e-5, atol=1e-6)


def test_hf_gradient_checkpointing_and_replay_give_full_bptt_gradients(gpt2):
    ids = torch.randint(1, 300, (2, 24))
    segments = split_segments(ids[:, :-1], ids[:, 1:], 8)
    grads = {}
    for name, flat, replay in (("plain", {}, False), ("checkpointing", {"train.activation_checkpointing": True}, False),
                               ("replay", {}, True)):
        torch.manual_seed(0)
        model, _ = hf_model(gpt2, "rmt", **flat)
        model.train()  # (the tiny GPT-2 has no dropout)
        assert model.backbone.hf.is_activation_checkpointing == (name == "checkpointing")
        train_segments(model, segments, bptt_unroll=-1, replay=replay)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in ("checkpointing", "replay"):
        for n, g in grads["plain"].items():
            torch.testing.assert_close(grads[name][n], g, rtol=1e-4, atol=1e-6, msg=f"{name}: {n}")
    assert grads["plain"]["memory_init.weight"].abs().sum() > 0


def test_save_pretrained_and_from_pretrained_round_trip(gpt2, bert, tmp_path):
    for path, classes in ((gpt2, 0), (bert, 2)):
        model, cfg = hf_model(path, "rmt", classes=classes, **{"data.segment_len": 8})
        with torch.no_grad():
            model.memory_init.weight.add_(1.0)
            next(model.backbone.hf.parameters()).add_(0.5)
        ids = torch.randint(1, 300, (2, 16))
        segments = [(s, None) for s in ids.split(8, dim=1)]
        want = forward_segments(model, segments)[0][-1].logits
        out = tmp_path / Path(path).name
        save_pretrained(model, out, cfg)
        loaded, loaded_cfg = from_pretrained(out)
        assert (loaded_cfg.memory.kind, loaded_cfg.memory.num_tokens, loaded_cfg.data.segment_len) == ("rmt", 3, 8)
        torch.testing.assert_close(forward_segments(loaded, segments)[0][-1].logits, want)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_generate_with_memory_and_cache_matches_greedy_full_forward(gpt2, llama, which):
    model, _ = hf_model(gpt2 if which == "gpt2" else llama, "rmt", num_tokens=2)
    prompt = torch.randint(1, 300, (2, 13))
    got = rmt_dist.generate(model, prompt, segment_len=5, max_new_tokens=9)  # crosses two segment ends
    assert got.shape == (2, 22) and torch.equal(got[:, :13], prompt)
    seq = prompt
    for _ in range(9):  # reference: no cache, every token re-run through all segments
        outputs, _ = forward_segments(model, split_segments(seq, seq, 5))
        seq = torch.cat([seq, outputs[-1].logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)
    sampled = rmt_dist.generate(model, prompt, segment_len=5, max_new_tokens=4, temperature=1.0, top_k=5,
                                generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 17)


@pytest.mark.parametrize("flat, message", [
    ({"memory.kind": "xl", "memory.xl_len": 4}, "memory.kind must be one of none, memtr, rmt for model.backbone=hf"),
    ({"model.hf_name_or_path": ""}, "model.hf_name_or_path must be set when model.backbone=hf"),
    ({"train.curriculum": "steps:x"}, "train.curriculum must be"),
])
def test_hf_config_errors_are_one_line(flat, message):
    cfg = from_flat({"model.backbone": "hf", "model.hf_name_or_path": "gpt2", **flat})
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


@pytest.mark.parametrize("job, which, flat, message", [
    ("finetune_lm", "bert", {}, "model.hf_name_or_path must be a causal LM for data.dataset=smoke"),
    ("classify_long", "gpt2", {"data.path": "docs.jsonl"}, "model.hf_name_or_path must be an encoder"),
    ("finetune_lm", "missing", {}, "model.hf_name_or_path must be a Hugging Face model"),
    ("finetune_lm", "gpt2", {"memory.kind": "xl"}, "memory.kind must be one of none, memtr, rmt for model.backbone=hf"),
    ("finetune_lm", "gpt2", {"storage.export_path": "s3://b/x"}, "storage.export_path must be a local directory"),
])
def test_jobs_refuse_a_model_that_does_not_fit_before_any_worker_starts(gpt2, bert, tmp_path, capsys, job, which,
                                                                       flat, message):
    from rmt_dist.cli import run_job
    from rmt_dist.presets import PRESETS

    path = {"gpt2": gpt2, "bert": bert, "missing": str(tmp_path / "nothing")}[which]
    argv = ["--model.hf_name_or_path", path, "--storage.path", str(tmp_path / "runs"),
            "--data.cache_dir", str(tmp_path / "cache")]
    for key, value in flat.items():
        argv += [f"--{key}", str(tmp_path / value) if key == "data.path" else value]
    with pytest.raises(SystemExit) as exit_info:
        run_job(job, PRESETS[job], argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err, err
