"""Run configuration: nested dataclasses, presets, dotted command-line overrides and validation.

Every job takes ``--preset NAME`` followed by dotted overrides::

    python jobs/lm_wikitext.py --preset smoke --memory.num_tokens 10 --memory.bptt_unroll 2

The flat form (``{"memory.num_tokens": 10, ...}``) is what MLflow logs as params and what Ray Tune
param spaces use; ``from_flat(to_flat(cfg)) == cfg``. Bad values raise :class:`ConfigError` with one
line naming the key, the value and the rule; jobs turn it into exit code 2 before any worker starts.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

from rmt_dist.memory_kinds import MEMORY_KINDS, kinds_where
from rmt_dist.workload_kinds import DATASETS, TASKS, sample_datasets


class ConfigError(ValueError):
    """An invalid configuration value; ``str(err)`` is the one line shown to the user."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field whose help text becomes the ``--help`` line of its dotted key."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    backbone: str = _f("builtin", "builtin (decoder-only pre-LN transformer) or hf (pretrained Hugging Face model)")
    hf_name_or_path: str = _f("", "hub name or local directory of the pretrained model (backbone=hf)")
    vocab_size: int = _f(0, "output vocabulary; 0 = take it from the data's tokenizer")
    d_model: int = _f(64, "model width")
    n_layers: int = _f(2, "transformer blocks")
    n_heads: int = _f(4, "attention heads; must divide d_model")
    d_ff: int = _f(256, "feed-forward hidden width")
    dropout: float = _f(0.0, "dropout probability in attention output and feed-forward")
    rope_base: float = _f(10000.0, "rotary position embedding base")


@dataclass
class MemoryConfig:
    kind: str = _f("rmt", " | ".join(MEMORY_KINDS) + " (rmt_dist/memory_kinds.py says what each is)")
    num_tokens: int = _f(10, "memory tokens (memtr, rmt, rmt_xl)")
    xl_len: int = _f(0, "Transformer-XL cache length per layer (xl, rmt_xl; infinite: the short-term memory)")
    bptt_unroll: int = _f(2, "previous segments gradients reach: 0 = detach every segment, -1 = full BPTT")
    bptt_mode: str = _f("sliding", "sliding (each segment's loss reaches exactly k previous) | window (detach every k+1)")
    replay_backprop: bool = _f(False, "full BPTT at constant activation memory by recomputing segments backwards")
    aux_loss_weight: float = _f(0.0, "weight of the auxiliary memory-token loss (rmt_xl; the paper used 0.01)")
    ltm_basis: int = _f(64, "infinite: Gaussian basis functions N of each layer's long-term memory (its size: N x d)")
    ltm_tau: float = _f(0.5, "infinite: share [0, tau] of the signal the old memory is contracted into at each update")
    ltm_ridge: float = _f(0.5, "infinite: ridge penalty lambda of the coefficient fit")
    ltm_samples: int = _f(64, "infinite: points M the old signal is sampled at before each refit")
    sticky: bool = _f(False, "infinite: sample the old signal where it got attention (sticky memories), not evenly")


@dataclass
class DataConfig:
    dataset: str = _f("smoke", " | ".join(DATASETS) + " (classify: documents with text and label; model.backbone=hf)")
    path: str = _f("", "local directory/file or s3://bucket/prefix of the corpus; empty = the default source")
    endpoint_url: str = _f("", "custom S3 endpoint for an s3:// data.path; empty = $AWS_ENDPOINT_URL or AWS")
    segment_len: int = _f(32, "tokens per segment")
    num_segments: int = _f(4, "segments per training window (LM) or per sample (tasks)")
    task: str = _f("copy", " | ".join(TASKS) + " (retrieval_*: the 1M-token paper's fact in distractor text, "
                           "a question at the end)")
    task_length: int = _f(8, "source length of copy/reverse, pairs for assoc, sequence length for sort, "
                             "characters before the answer for retrieval_*")
    num_train: int = _f(0, "training samples for tasks; 0 = the paper's size (100,000)")
    num_valid: int = _f(0, "validation samples for tasks; 0 = the paper's size (5,000; quadratic 10,000)")
    num_test: int = _f(0, "test samples for tasks; 0 = the paper's size (10,000; quadratic 20,000)")
    seed: int = _f(0, "seed of the task generators: the same seed and sizes give the same splits")
    cache_dir: str = _f("", "where tokenized corpora are cached; empty = ~/.cache/rmt_dist")


@dataclass
class TrainConfig:
    batch_size: int = _f(8, "sequences (streams or samples) per worker per step")
    optimizer: str = _f("adamw", "adamw | sgd (plain SGD, no momentum: the reference for gradient checks)")
    lr: float = _f(1e-3, "peak learning rate")
    lr_schedule: str = _f("cosine", "constant | linear | cosine (after warmup)")
    warmup_steps: int = _f(0, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient norm clipping; 0 = off")
    max_steps: int = _f(100, "optimizer steps")
    eval_interval: int = _f(50, "steps between evaluations and checkpoints")
    eval_batches: int = _f(0, "validation batches per evaluation; 0 = the whole validation split")
    activation_checkpointing: bool = _f(False, "recompute each block in backward (non-reentrant)")
    recompute: str = _f("all", "with activation checkpointing, what backward recomputes: all (keep only block "
                               "inputs) | elementwise (keep matmul and attention outputs; recompute norms, GELU, rotary)")
    compile: bool = _f(False, "torch.compile each transformer block (model.backbone=builtin): fewer, fused kernels; "
                              "the first steps compile each variant (grad/no-grad, checkpointing), ~10-60 s each")
    curriculum: str = _f("", "grow segments from 1 up to data.num_segments (sample data): empty = off, "
                             "steps:200,400 (one more at each step), acc:0.9 (one more when val_acc >= 0.9)")
    seed: int = _f(0, "random seed")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(2, "ZeRO stage 0-3")
    offload_optimizer: bool = _f(False, "optimizer state on CPU (ZeRO 1-3)")
    offload_params: bool = _f(False, "parameters on CPU (ZeRO 3)")
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16")


@dataclass
class ScalingConfig:
    num_workers: int = _f(2, "Ray Train workers")
    use_gpu: bool = _f(False, "one GPU per worker")
    cpus_per_worker: int = _f(1, "CPUs reserved per worker (torch threads are pinned to it)")
    max_failures: int = _f(0, "worker-group restarts from the last checkpoint")
    placement_strategy: str = _f("PACK", "how workers spread over nodes: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD")


@dataclass
class MlflowConfig:
    tracking_uri: str = _f("", "MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = _f("", "experiment name; empty = the job's name")
    artifact_location: str = _f("", "artifact root for a new experiment (e.g. s3://bucket/mlflow); empty = the server's")
    enabled: bool = _f(True, "log to MLflow")


@dataclass
class StorageConfig:
    path: str = _f("./ray_results", "checkpoints and Ray results: a local directory or s3://bucket/prefix")
    run_name: str = _f("", "Ray Train run name; rerunning with the same path and name resumes it; empty = job-time")
    endpoint_url: str = _f("", "custom S3 endpoint; empty = $AWS_ENDPOINT_URL or AWS")
    num_to_keep: int = _f(2, "checkpoints kept")
    export_path: str = _f("", "local directory to save the trained model in as a Hugging Face-style directory "
                              "(model.backbone=hf); empty = none")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


def _key_types() -> dict[str, type]:
    hints = {}
    for section in dataclasses.fields(Config):
        section_type = typing.get_type_hints(Config)[section.name]
        for name, tp in typing.get_type_hints(section_type).items():
            hints[f"{section.name}.{name}"] = tp
    return hints


KEY_TYPES: dict[str, type] = _key_types()


def to_flat(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every field, in declaration order."""
    return {
        f"{section}.{name}": value
        for section in SECTIONS
        for name, value in dataclasses.asdict(getattr(cfg, section)).items()
    }


def _coerce(key: str, value: Any) -> Any:
    tp = KEY_TYPES[key]
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    return str(value)


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys replaced; unknown keys and untyped values raise ConfigError."""
    cfg = from_flat(to_flat(cfg))
    for key, value in overrides.items():
        if key not in KEY_TYPES:
            raise ConfigError(f"unknown config key {key!r} (see --help for the keys)")
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, _coerce(key, value))
    return cfg


def from_flat(flat: Mapping[str, Any]) -> Config:
    """Inverse of :func:`to_flat`; missing keys keep their defaults."""
    cfg = Config()
    for key, value in flat.items():
        if key not in KEY_TYPES:
            raise ConfigError(f"unknown config key {key!r} (see --help for the keys)")
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, _coerce(key, value))
    return cfg


def parse_curriculum(text: str) -> tuple[str, list[int] | float] | None:
    """``train.curriculum`` -> None, ("steps", increasing steps) or ("acc", threshold); ConfigError if malformed."""
    if not text:
        return None
    kind, _, arg = text.partition(":")
    try:
        if kind == "steps":
            steps = [int(s) for s in arg.split(",")]
            if steps == sorted(set(steps)) and steps[0] >= 1:
                return kind, steps
        elif kind == "acc" and 0.0 < float(arg) <= 1.0:
            return kind, float(arg)
    except ValueError:
        pass
    raise ConfigError(f"train.curriculum must be empty, steps:N1,N2,... (increasing, >= 1) or acc:X (0 < X <= 1), "
                      f"got {text!r}")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Raise ConfigError on the first invalid value; return ``cfg`` unchanged otherwise."""
    m, mem, d, t, ds, s = cfg.model, cfg.memory, cfg.data, cfg.train, cfg.deepspeed, cfg.scaling
    _check(m.backbone in ("builtin", "hf"), "model.backbone", m.backbone, "one of builtin, hf")
    _check(m.backbone != "hf" or bool(m.hf_name_or_path), "model.hf_name_or_path", m.hf_name_or_path,
           "set when model.backbone=hf")
    _check(mem.kind in MEMORY_KINDS, "memory.kind", mem.kind, "one of " + ", ".join(MEMORY_KINDS))
    kind = MEMORY_KINDS[mem.kind]
    _check(m.backbone != "hf" or kind.hf, "memory.kind", mem.kind,
           f"one of {', '.join(kinds_where(hf=True))} for model.backbone=hf (HF models have no per-layer cache input)")
    _check(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, ">= 0")
    for key in ("d_model", "n_layers", "n_heads", "d_ff"):
        _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), ">= 1")
    _check(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads, f"a divisor of model.d_model={m.d_model}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "in [0, 1)")
    _check(m.rope_base > 0, "model.rope_base", m.rope_base, "> 0")

    _check(mem.num_tokens >= 0, "memory.num_tokens", mem.num_tokens, ">= 0")
    _check(not kind.write_tokens or mem.num_tokens >= 1, "memory.num_tokens", mem.num_tokens,
           f">= 1 for memory.kind={mem.kind} (use memory.kind=none or xl for no memory tokens)")
    _check(mem.xl_len >= 0, "memory.xl_len", mem.xl_len, ">= 0")
    _check(not kind.xl_required or mem.xl_len >= 1, "memory.xl_len", mem.xl_len, f">= 1 for memory.kind={mem.kind}")
    _check(mem.bptt_unroll >= -1, "memory.bptt_unroll", mem.bptt_unroll, ">= -1 (-1 = full BPTT)")
    _check(mem.bptt_mode in ("sliding", "window"), "memory.bptt_mode", mem.bptt_mode, "one of sliding, window")
    _check(not mem.replay_backprop or mem.bptt_unroll == -1, "memory.replay_backprop", mem.replay_backprop,
           "false unless memory.bptt_unroll=-1 (replay is full BPTT)")
    _check(mem.aux_loss_weight >= 0, "memory.aux_loss_weight", mem.aux_loss_weight, ">= 0")
    _check(mem.aux_loss_weight == 0 or kind.write_tokens, "memory.aux_loss_weight", mem.aux_loss_weight,
           f"0 unless memory.kind is {' or '.join(kinds_where(write_tokens=True))}")
    _check(mem.ltm_basis >= 2, "memory.ltm_basis", mem.ltm_basis, ">= 2")
    _check(0.0 < mem.ltm_tau < 1.0, "memory.ltm_tau", mem.ltm_tau, "in (0, 1)")
    _check(mem.ltm_ridge > 0, "memory.ltm_ridge", mem.ltm_ridge, "> 0")
    _check(mem.ltm_samples >= 1, "memory.ltm_samples", mem.ltm_samples, ">= 1")
    _check(not mem.sticky or kind.ltm, "memory.sticky", mem.sticky,
           f"false unless memory.kind={' or '.join(kinds_where(ltm=True))}")

    _check(d.segment_len >= 1, "data.segment_len", d.segment_len, ">= 1")
    _check(d.num_segments >= 1, "data.num_segments", d.num_segments, ">= 1")
    _check(d.dataset in DATASETS, "data.dataset", d.dataset, "one of " + ", ".join(DATASETS))
    dataset = DATASETS[d.dataset]
    _check(dataset.workload != "task" or d.task in TASKS, "data.task", d.task, "one of " + ", ".join(TASKS))
    _check(not d.path or dataset.path != "none", "data.path", d.path,
           f"empty for data.dataset={d.dataset} (the smoke corpus ships with Python)")
    _check(bool(d.path) or dataset.path != "required", "data.path", d.path,
           f"{dataset.path_rule} for data.dataset={d.dataset}")
    _check(not dataset.backbone or m.backbone == dataset.backbone, "model.backbone", m.backbone,
           f"{dataset.backbone} for data.dataset={d.dataset} ({dataset.backbone_rule})")
    _check(d.task_length >= 1, "data.task_length", d.task_length, ">= 1")
    _check(d.seed >= 0, "data.seed", d.seed, ">= 0")
    for key in ("num_train", "num_valid", "num_test"):
        _check(getattr(d, key) >= 0, f"data.{key}", getattr(d, key), ">= 0 (0 = the paper's size)")

    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    _check(t.optimizer in ("adamw", "sgd"), "train.optimizer", t.optimizer, "one of adamw, sgd")
    _check(t.lr > 0, "train.lr", t.lr, "> 0")
    _check(t.lr_schedule in ("constant", "linear", "cosine"), "train.lr_schedule", t.lr_schedule,
           "one of constant, linear, cosine")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, ">= 0")
    _check(t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1")
    _check(t.eval_interval >= 1, "train.eval_interval", t.eval_interval, ">= 1")
    _check(t.eval_batches >= 0, "train.eval_batches", t.eval_batches, ">= 0")
    _check(t.recompute in ("all", "elementwise"), "train.recompute", t.recompute, "one of all, elementwise")
    _check(t.recompute == "all" or cfg.model.backbone == "builtin", "train.recompute", t.recompute,
           "all with model.backbone=hf (the Hugging Face model's own gradient checkpointing)")
    _check(not t.compile or m.backbone == "builtin", "train.compile", t.compile, "false with model.backbone=hf")
    _check(not t.compile or ds.zero_stage < 3, "train.compile", t.compile, "false with deepspeed.zero_stage=3 "
           "(dynamo traces ZeRO-3's parameter hooks and recompiles at every call)")
    if parse_curriculum(t.curriculum) is not None:
        _check(dataset.samples, "train.curriculum", t.curriculum,
               f"empty unless data.dataset is one of {', '.join(sample_datasets())} (samples of segments)")
        _check(dataset.workload != "task" or d.task.startswith("retrieval"), "train.curriculum", t.curriculum,
               f"empty for data.task={d.task} (of the tasks only retrieval_* grow with the segment count)")
        # DeepSpeed's accumulation count is fixed at initialisation: it must not depend on the segments.
        one_backward = (mem.bptt_unroll == -1 and not mem.replay_backprop) or (
            mem.bptt_mode == "window" and mem.bptt_unroll + 1 >= d.num_segments)
        _check(one_backward, "train.curriculum", t.curriculum,
               "empty unless a step makes one backward call at every segment count (memory.bptt_unroll=-1 "
               "without replay, or bptt_mode=window with bptt_unroll >= data.num_segments - 1)")

    _check(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", ds.zero_stage, "one of 0, 1, 2, 3")
    _check(not ds.offload_params or ds.zero_stage == 3, "deepspeed.offload_params", ds.offload_params,
           "false unless deepspeed.zero_stage=3")
    _check(not ds.offload_optimizer or ds.zero_stage >= 1, "deepspeed.offload_optimizer",
           ds.offload_optimizer, "false when deepspeed.zero_stage=0")
    _check(ds.precision in ("auto", "fp32", "bf16"), "deepspeed.precision", ds.precision,
           "one of auto, fp32, bf16")

    _check(s.num_workers >= 1, "scaling.num_workers", s.num_workers, ">= 1")
    _check(s.cpus_per_worker >= 1, "scaling.cpus_per_worker", s.cpus_per_worker, ">= 1")
    _check(s.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), "scaling.placement_strategy",
           s.placement_strategy, "one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
    _check(s.max_failures >= -1, "scaling.max_failures", s.max_failures, ">= -1 (-1 = retry forever)")
    _check(cfg.storage.num_to_keep >= 1, "storage.num_to_keep", cfg.storage.num_to_keep, ">= 1")
    _check(not cfg.storage.export_path or m.backbone == "hf", "storage.export_path", cfg.storage.export_path,
           "empty unless model.backbone=hf")
    _check("://" not in cfg.storage.export_path, "storage.export_path", cfg.storage.export_path, "a local directory")
    _check(bool(cfg.storage.path), "storage.path", cfg.storage.path, "a local directory or s3://bucket/prefix")
    return cfg


def help_text(presets: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["usage: [--preset NAME] [--section.key VALUE ...]", "",
             "presets: " + ", ".join(presets), "", "keys (default: help):"]
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            lines.append(f"  --{section.name}.{f.name} ({f.default!r}): {f.metadata['help']}")
    return "\n".join(lines)


@dataclass
class CommandLine:
    """A command line read once: ``--preset``, the dotted overrides and the caller's own flags."""

    preset: str | None  # None when --preset was not given
    overrides: list[tuple[str, str]]  # (dotted key or alias, value) in the order given; the last one wins
    extra: dict[str, list[str]]  # each of the caller's own flags that was given: its values in order


def read_args(argv: Sequence[str], extra: Collection[str] = ()) -> CommandLine:
    """Split ``--name VALUE`` / ``--name=VALUE`` pairs into the preset, config overrides and the flags
    named in ``extra`` (a script's own flags, e.g. the sweep's ``--job``). ConfigError if malformed."""
    args = list(argv)
    line = CommandLine(preset=None, overrides=[], extra={})
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if key == "preset":
            line.preset = value
        elif key in extra:
            line.extra.setdefault(key, []).append(value)
        else:
            line.overrides.append((key, value))
    return line


def config_from_args(line: CommandLine, presets: Mapping[str, Mapping[str, Any]], default_preset: str = "smoke",
                     aliases: Mapping[str, str] | None = None) -> Config:
    """The preset named on the command line (else ``default_preset``) with its overrides -> a validated
    Config. ``aliases`` maps short flags to keys (``{"task": "data.task"}``)."""
    preset = default_preset if line.preset is None else line.preset
    if preset not in presets:
        raise ConfigError(f"--preset must be one of {', '.join(presets)}, got {preset!r}")
    overrides = {(aliases or {}).get(key, key): value for key, value in line.overrides}
    return validate(apply_overrides(from_flat(presets[preset]), overrides))


def parse_args(argv: Sequence[str], presets: Mapping[str, Mapping[str, Any]],
               default_preset: str = "smoke", aliases: Mapping[str, str] | None = None) -> Config:
    """``--preset NAME`` then ``--section.key VALUE`` (or ``=VALUE``) pairs -> a validated Config.

    ``aliases`` maps short flags to keys (``{"task": "data.task"}``). Prints help and exits 0 on
    ``--help``; raises ConfigError on anything else that is wrong.
    """
    if "--help" in argv or "-h" in argv:
        print(help_text(presets))
        raise SystemExit(0)
    return config_from_args(read_args(argv), presets, default_preset, aliases)


def exit_on_config_error(err: ConfigError) -> typing.NoReturn:
    """The one-line error and exit code 2 that every job uses for bad input."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)
