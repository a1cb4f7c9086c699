"""Config: one-line errors naming key, value and rule; unknown keys; the flat form round-trips;
``--preset`` with dotted overrides in both ``--k v`` and ``--k=v`` forms; ``--help``."""

from __future__ import annotations

import dataclasses

import pytest

from rmt_dist.config import (KEY_TYPES, Config, ConfigError, apply_overrides, exit_on_config_error, from_flat,
                             parse_args, to_flat, validate)
from rmt_dist.presets import PRESETS

# (overrides, the exact message): one per rule kind.
INVALID = [
    ({"memory.num_tokens": -3}, "memory.num_tokens must be >= 0, got -3"),
    ({"memory.kind": "lstm"}, "memory.kind must be one of none, memtr, xl, rmt, rmt_xl, infinite, got 'lstm'"),
    ({"memory.kind": "rmt", "memory.num_tokens": 0},
     "memory.num_tokens must be >= 1 for memory.kind=rmt (use memory.kind=none or xl for no memory tokens), got 0"),
    ({"memory.kind": "xl", "memory.xl_len": 0}, "memory.xl_len must be >= 1 for memory.kind=xl, got 0"),
    ({"memory.bptt_unroll": -2}, "memory.bptt_unroll must be >= -1 (-1 = full BPTT), got -2"),
    ({"memory.bptt_mode": "full"}, "memory.bptt_mode must be one of sliding, window, got 'full'"),
    ({"memory.replay_backprop": True, "memory.bptt_unroll": 2},
     "memory.replay_backprop must be false unless memory.bptt_unroll=-1 (replay is full BPTT), got True"),
    ({"memory.kind": "xl", "memory.xl_len": 4, "memory.aux_loss_weight": 0.01},
     "memory.aux_loss_weight must be 0 unless memory.kind is rmt or rmt_xl, got 0.01"),
    ({"memory.kind": "infinite", "memory.ltm_basis": 1}, "memory.ltm_basis must be >= 2, got 1"),
    ({"memory.kind": "infinite", "memory.ltm_tau": 1.0}, "memory.ltm_tau must be in (0, 1), got 1.0"),
    ({"memory.kind": "infinite", "memory.ltm_ridge": 0}, "memory.ltm_ridge must be > 0, got 0.0"),
    ({"memory.kind": "infinite", "memory.ltm_samples": 0}, "memory.ltm_samples must be >= 1, got 0"),
    ({"memory.kind": "xl", "memory.xl_len": 4, "memory.sticky": True},
     "memory.sticky must be false unless memory.kind=infinite, got True"),
    ({"model.n_heads": 3}, "model.n_heads must be a divisor of model.d_model=64, got 3"),
    ({"model.n_layers": 0}, "model.n_layers must be >= 1, got 0"),
    ({"model.dropout": 1.0}, "model.dropout must be in [0, 1), got 1.0"),
    ({"model.backbone": "hf"}, "model.hf_name_or_path must be set when model.backbone=hf, got ''"),
    ({"data.segment_len": 0}, "data.segment_len must be >= 1, got 0"),
    ({"train.lr": 0}, "train.lr must be > 0, got 0.0"),
    ({"deepspeed.zero_stage": 4}, "deepspeed.zero_stage must be one of 0, 1, 2, 3, got 4"),
    ({"deepspeed.offload_params": True},
     "deepspeed.offload_params must be false unless deepspeed.zero_stage=3, got True"),
    ({"scaling.num_workers": 0}, "scaling.num_workers must be >= 1, got 0"),
]


@pytest.mark.parametrize("overrides,message", INVALID, ids=[m.split(" ")[0] for _, m in INVALID])
def test_invalid_value_is_one_line_naming_key_value_and_rule(overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(Config(), overrides))
    assert str(err.value) == message
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key,value,message", [
    ("memory.num_tokens", "ten", "memory.num_tokens must be an integer, got 'ten'"),
    ("memory.num_tokens", 2.5, "memory.num_tokens must be an integer, got 2.5"),
    ("memory.replay_backprop", "maybe", "memory.replay_backprop must be true or false, got 'maybe'"),
    ("train.lr", "fast", "train.lr must be a number, got 'fast'"),
])
def test_untyped_value_is_one_line(key, value, message) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.") + "$"):
        apply_overrides(Config(), {key: value})


def test_values_are_coerced_from_text() -> None:
    cfg = apply_overrides(Config(), {"memory.num_tokens": "1_000", "memory.replay_backprop": "yes", "train.lr": "3e-4",
                                     "train.activation_checkpointing": "0", "memory.kind": "xl"})
    assert (cfg.memory.num_tokens, cfg.memory.replay_backprop, cfg.train.lr) == (1000, True, 3e-4)
    assert cfg.train.activation_checkpointing is False and cfg.memory.kind == "xl"


@pytest.mark.parametrize("call", [lambda: from_flat({"memory.num_token": 3}),
                                  lambda: apply_overrides(Config(), {"memory.num_token": 3}),
                                  lambda: parse_args(["--memory.num_token", "3"], PRESETS["lm_wikitext"])])
def test_unknown_key_is_rejected(call) -> None:
    with pytest.raises(ConfigError, match=r"^unknown config key 'memory.num_token' \(see --help for the keys\)$"):
        call()


def test_defaults_and_every_preset_round_trip_through_the_flat_form() -> None:
    configs = [Config()] + [from_flat(p) for job in PRESETS.values() for p in job.values()]
    for cfg in configs:
        flat = to_flat(cfg)
        assert list(flat) == list(KEY_TYPES)
        assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())  # MLflow params, Tune
        assert from_flat(flat) == cfg
        assert from_flat({k: str(v) for k, v in flat.items()}) == cfg  # as logged text, too


@pytest.mark.parametrize("job,preset", [(job, name) for job in PRESETS for name in PRESETS[job]])
def test_every_preset_is_valid(job, preset) -> None:
    flat = dict(PRESETS[job][preset])
    if flat.get("data.dataset") in ("enwik8", "classify"):
        flat["data.path"] = "/data/" + flat["data.dataset"]  # the one value a user must give
    cfg = from_flat(flat)
    assert validate(cfg) is cfg  # raises ConfigError on the first invalid value


def test_overrides_copy_and_never_mutate() -> None:
    cfg = Config()
    new = apply_overrides(cfg, {"memory.num_tokens": 5})
    assert cfg.memory.num_tokens == 10 and new.memory.num_tokens == 5
    assert dataclasses.replace(new.memory, num_tokens=10) == cfg.memory


def test_parse_args_preset_then_dotted_overrides_in_both_forms() -> None:
    presets = PRESETS["lm_wikitext"]
    cfg = parse_args(["--preset", "paper", "--model.n_heads", "5", "--memory.num_tokens", "25",
                      "--memory.bptt_unroll=3", "--train.activation_checkpointing=false", "--memory.kind", "rmt_xl",
                      "--memory.xl_len=75"],
                     presets)
    assert cfg.model.d_model == presets["paper"]["model.d_model"] == 410  # from the preset
    assert (cfg.memory.num_tokens, cfg.memory.bptt_unroll, cfg.memory.kind, cfg.memory.xl_len) == (25, 3, "rmt_xl", 75)
    assert cfg.train.activation_checkpointing is False
    assert cfg.data.segment_len == presets["paper"]["data.segment_len"]
    # The default preset, and a later flag wins.
    cfg = parse_args(["--memory.num_tokens", "2", "--memory.num_tokens=6"], presets)
    assert cfg.memory.num_tokens == 6 and cfg.model.d_model == presets["smoke"]["model.d_model"]
    # Aliases map short flags to keys.
    cfg = parse_args(["--task", "reverse"], PRESETS["algorithmic"], aliases={"task": "data.task"})
    assert cfg.data.task == "reverse"


@pytest.mark.parametrize("argv,message", [
    (["--preset", "huge"], "--preset must be one of smoke, paper, got 'huge'"),
    (["--memory.kind"], "--memory.kind needs a value"),
    (["memory.kind", "rmt"], "unexpected argument 'memory.kind': options look like --section.key VALUE"),
    (["--memory.num_tokens=-3"], "memory.num_tokens must be >= 0, got -3"),
    (["--memory.kind", "rmt", "--memory.num_tokens", "0"],
     "memory.num_tokens must be >= 1 for memory.kind=rmt (use memory.kind=none or xl for no memory tokens), got 0"),
])
def test_parse_args_errors(argv, message) -> None:
    with pytest.raises(ConfigError) as err:
        parse_args(argv, PRESETS["lm_wikitext"])
    assert str(err.value) == message


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_and_lists_every_key_with_its_help(flag, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--memory.kind", "rmt", flag], PRESETS["lm_wikitext"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "presets: smoke, paper" in out
    for key in KEY_TYPES:
        assert f"--{key} (" in out
    assert "--memory.bptt_unroll (2): previous segments gradients reach" in out


def test_config_error_exits_2_with_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        exit_on_config_error(ConfigError("memory.num_tokens must be >= 0, got -3"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: memory.num_tokens must be >= 0, got -3\n"
