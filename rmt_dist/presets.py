"""Named presets per job, as flat dotted overrides of the config defaults.

``smoke`` is tiny (2 CPU workers, ZeRO-2, a minute or two on a laptop); ``paper`` carries the
hyperparameters of the RMT paper (../shared/PAPERS.md) for a GPU cluster.
"""

from __future__ import annotations

from typing import Any

_SMOKE_COMMON: dict[str, Any] = {
    "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.d_ff": 256,
    "memory.kind": "rmt", "memory.num_tokens": 4, "memory.bptt_unroll": 1, "memory.bptt_mode": "sliding",
    "train.batch_size": 4, "train.lr": 1e-3, "train.warmup_steps": 5,
    "deepspeed.zero_stage": 2, "scaling.num_workers": 2, "scaling.use_gpu": False,
}

_PAPER_COMMON: dict[str, Any] = {
    "memory.kind": "rmt", "memory.bptt_mode": "sliding", "train.lr_schedule": "cosine",
    "deepspeed.zero_stage": 2, "scaling.num_workers": 2, "scaling.use_gpu": True, "scaling.cpus_per_worker": 8,
    "train.activation_checkpointing": True, "train.grad_clip": 0.25,
}

# Pretrained Hugging Face models: hub names for users (tests pass local directories).
_HF_SMOKE: dict[str, Any] = {
    **_SMOKE_COMMON, "model.backbone": "hf", "train.batch_size": 2, "train.lr": 1e-4, "train.warmup_steps": 2,
    "train.max_steps": 20, "train.eval_interval": 10, "train.eval_batches": 2,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "lm_wikitext": {
        "smoke": {**_SMOKE_COMMON, "data.dataset": "smoke", "data.segment_len": 32, "data.num_segments": 2,
                  "train.max_steps": 30, "train.eval_interval": 15, "train.eval_batches": 4},
        # WikiText-103 as in the paper: Tr-XL base hyperparameters, segment 150, memory 10, BPTT 2.
        "paper": {**_PAPER_COMMON, "data.dataset": "wikitext-103", "data.segment_len": 150, "data.num_segments": 4,
                  "model.d_model": 410, "model.n_layers": 16, "model.n_heads": 10, "model.d_ff": 2100,
                  "model.dropout": 0.1, "memory.num_tokens": 10, "memory.bptt_unroll": 2,
                  "train.batch_size": 30, "train.lr": 2.5e-4, "train.max_steps": 200_000,
                  "train.eval_interval": 4000, "train.eval_batches": 0},
    },
    "lm_enwik8": {
        "smoke": {**_SMOKE_COMMON, "data.dataset": "smoke-bytes", "data.segment_len": 64, "data.num_segments": 2,
                  "train.max_steps": 30, "train.eval_interval": 15, "train.eval_batches": 4},
        # enwik8 as in the paper: 12 layers, 8 heads, d 512, segment 128, memory 10, BPTT 2.
        "paper": {**_PAPER_COMMON, "data.dataset": "enwik8", "data.segment_len": 128, "data.num_segments": 4,
                  "model.d_model": 512, "model.n_layers": 12, "model.n_heads": 8, "model.d_ff": 2048,
                  "model.dropout": 0.1, "memory.num_tokens": 10, "memory.bptt_unroll": 2,
                  "train.batch_size": 22, "train.lr": 2.5e-4, "train.max_steps": 400_000,
                  "train.eval_interval": 4000, "train.eval_batches": 0},
    },
    "finetune_lm": {
        "smoke": {**_HF_SMOKE, "model.hf_name_or_path": "gpt2", "data.dataset": "smoke", "data.segment_len": 64,
                  "data.num_segments": 2},
        # GPT-2 (124M) with 10 memory tokens on raw WikiText-103 (its BPE reads raw text): segments of 512.
        "paper": {**_PAPER_COMMON, "model.backbone": "hf", "model.hf_name_or_path": "gpt2",
                  "data.dataset": "wikitext-103-raw", "data.segment_len": 512, "data.num_segments": 4,
                  "memory.num_tokens": 10, "memory.bptt_unroll": 2, "train.batch_size": 8, "train.lr": 5e-5,
                  "train.warmup_steps": 500, "train.max_steps": 20_000, "train.eval_interval": 1000,
                  "train.eval_batches": 50, "train.grad_clip": 1.0},
    },
    "classify_long": {
        "smoke": {**_HF_SMOKE, "model.hf_name_or_path": "bert-base-uncased", "data.dataset": "classify",
                  "data.segment_len": 128, "data.num_segments": 4, "memory.bptt_unroll": -1,
                  "memory.bptt_mode": "window", "train.lr": 3e-5},
        # Hyperpartisan News as in the RMT paper: RoBERTa-base, segments of 500 tokens + 10 memory tokens,
        # up to 2,000 tokens, full BPTT over the 4 segments.
        "paper": {**_PAPER_COMMON, "model.backbone": "hf", "model.hf_name_or_path": "roberta-base",
                  "data.dataset": "classify", "data.segment_len": 500, "data.num_segments": 4,
                  "memory.num_tokens": 10, "memory.bptt_unroll": -1, "memory.bptt_mode": "window",
                  "train.batch_size": 8, "train.lr": 2e-5, "train.warmup_steps": 100, "train.max_steps": 2000,
                  "train.eval_interval": 100, "train.eval_batches": 0, "train.grad_clip": 1.0},
    },
    "algorithmic": {
        # Copy, source 8 written twice, 3 segments of 8: RMT reaches 1.0 token accuracy in ~30 s of 2 CPUs.
        "smoke": {**_SMOKE_COMMON, "data.dataset": "task", "data.task": "copy", "data.task_length": 8,
                  "data.segment_len": 8, "data.num_segments": 3, "data.num_train": 20_000, "data.num_valid": 500,
                  "data.num_test": 500, "memory.bptt_unroll": -1, "memory.bptt_mode": "window",
                  "train.batch_size": 32, "train.lr": 3e-3, "train.max_steps": 500, "train.eval_interval": 250},
        # The paper's copy/reverse setting: 4 layers, 4 heads, d 128, LR 1e-4 constant, full BPTT.
        "paper": {**_PAPER_COMMON, "data.dataset": "task", "data.task": "copy", "data.task_length": 24,
                  "data.segment_len": 24, "data.num_segments": 3, "model.d_model": 128, "model.n_layers": 4,
                  "model.n_heads": 4, "model.d_ff": 512, "memory.num_tokens": 10, "memory.bptt_unroll": -1,
                  "memory.bptt_mode": "window", "train.lr_schedule": "constant", "train.lr": 1e-4,
                  "train.batch_size": 64, "train.max_steps": 100_000, "train.eval_interval": 2000,
                  "train.activation_checkpointing": False, "scaling.num_workers": 1},
    },
}
