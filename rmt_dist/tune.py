"""Sweeps: Ray Tune over the dotted config keys, one trial = one training run (the jobs' TorchTrainer).

Ray Train V2 (the default in Ray 2.60) rejects ``Tuner(trainer)``, so every trial runs the driver
pattern: the Tune function :func:`run_trial` builds the job's ``TorchTrainer`` itself (through
``rmt_dist.train.driver.build_trainer``) with ``RunConfig(name=f"train_{trial_id}",
callbacks=[TuneReportCallback()])`` and calls ``fit()``; Train's reports reach Tune through that
callback. The param space is ``{"train_loop_config": {...}, "sweep": {...}}``: the grid (a list of
override dicts, one per grid point) and the random keys in ``train_loop_config``; the sweep's constants
(job, base config, MLflow parent) in ``sweep``, so a restored sweep runs with exactly its original config.

What a sweep does (``jobs/sweep.py``):

- parse flags; expand the grid; apply, normalise and validate the config of every grid point and both
  ends of every random range; check storage and prepare every distinct data config. Bad input is one
  line and exit code 2 before Ray starts.
- ``memory.num_tokens=0`` is the no-memory baseline: rmt and memtr become ``memory.kind=none``
  (rmt_xl becomes ``xl``), and a ``none`` point runs once, with ``bptt_unroll=0``, however many unroll
  values the grid has (:func:`normalise_memory`).
- one MLflow parent run per sweep (search space, best trial, results table and plots), one nested child
  run per trial (its config as params, every metric, ``peak_mem_bytes`` and ``memory_state_bytes``).
- ``--scheduler asha`` stops trials early on the validation metric; a trial that raises is recorded as
  failed (Tune ERROR, MLflow FAILED with its error line) and the others go on.
- rerunning the same command (same ``--name`` and ``storage.path``) restores the sweep with
  ``Tuner.restore``: finished and failed trials are not rerun, an interrupted trial resumes from its
  last Train checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ray.tune import Callback as TuneCallback

from rmt_dist import report as R
from rmt_dist.config import KEY_TYPES, Config, ConfigError, _coerce, apply_overrides, from_flat, help_text, \
    parse_args, to_flat, validate
from rmt_dist.memory_kinds import memory_kind
from rmt_dist.presets import PRESETS
from rmt_dist.train import metrics as M
from rmt_dist.workload_kinds import validation_metric

JOBS = tuple(PRESETS)
# The default search space: memory size x BPTT unroll (PAPERS.md section 4's main axes); 0 = baseline.
DEFAULT_SPACE: dict[str, list[Any]] = {"memory.num_tokens": [0, 1, 5, 10, 25], "memory.bptt_unroll": [0, 1, 2, 4]}

# Sweep presets: overrides on top of the job's preset of the same name, and the default search space.
SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    # 4 tiny trials (baseline + 4 memory tokens x unroll 0/1/2), one worker each, 20 steps.
    "smoke": {"overrides": {"scaling.num_workers": 1, "train.max_steps": 20, "train.eval_interval": 10,
                            "train.eval_batches": 2},
              "space": {"memory.num_tokens": [0, 4], "memory.bptt_unroll": [0, 1, 2]}},
    "paper": {"overrides": {}, "space": DEFAULT_SPACE},
}

MEMORY_KEYS = ("memory.kind", "memory.num_tokens", "memory.xl_len", "memory.bptt_unroll")
SWEEP_LEVEL_SECTIONS = ("storage", "mlflow")  # one value per sweep: not searchable
TRIAL_CPU = 1  # what a trial's driver (the Tune function) reserves besides its Train workers


# ------------------------------------------------------------------------------------------ the space

@dataclass(frozen=True)
class Dim:
    """One searched key: a grid (``values``) or a random distribution (``choice``/``uniform``/...)."""

    key: str
    kind: str  # grid | choice | uniform | loguniform | randint
    values: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def describe(self) -> str:
        if self.kind in ("grid", "choice"):
            text = ",".join(str(v) for v in self.values)
            return text if self.kind == "grid" else f"choice:{text}"
        return f"{self.kind}:{self.low}:{self.high}"

    def domain(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # inclusive of HIGH
        raise ValueError(self.kind)

    def ends(self) -> list[Any]:
        """The values every trial config must accept: all choices, or both ends of a range."""
        return list(self.values) if self.kind in ("grid", "choice") else [self.low, self.high]


SEARCH_SYNTAX = ("KEY=V1,V2,... (grid) | KEY=choice:V1,V2 | KEY=uniform:LOW:HIGH | KEY=loguniform:LOW:HIGH | "
                 "KEY=randint:LOW:HIGH")


def parse_search(text: str) -> Dim:
    """``memory.num_tokens=1,5,10`` -> a grid; ``train.lr=loguniform:1e-4:1e-2`` -> a distribution."""
    key, eq, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not eq or not key:
        raise ConfigError(f"--search must look like {SEARCH_SYNTAX}, got {text!r}")
    if key not in KEY_TYPES:
        raise ConfigError(f"unknown config key {key!r} in --search (see --help for the keys)")
    if key.split(".", 1)[0] in SWEEP_LEVEL_SECTIONS:
        raise ConfigError(f"--search {key}: storage.* and mlflow.* are set once per sweep, not searched")
    if not spec:
        raise ConfigError(f"--search {key} needs values: {SEARCH_SYNTAX}")
    head, colon, rest = spec.partition(":")
    tp = KEY_TYPES[key]
    if colon and head in ("uniform", "loguniform", "randint"):
        parts = rest.split(":")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ConfigError(f"--search {key}={spec}: a range is {head}:LOW:HIGH")
        if head == "randint" and tp is not int:
            raise ConfigError(f"--search {key}={spec}: randint needs an integer key ({key} is {tp.__name__})")
        if head != "randint" and tp is not float:
            raise ConfigError(f"--search {key}={spec}: {head} needs a float key ({key} is {tp.__name__}; "
                              f"use randint:LOW:HIGH or a list)")
        low, high = (_coerce(key, p.strip()) for p in parts)
        if not low < high:
            raise ConfigError(f"--search {key}={spec}: LOW must be < HIGH")
        if head == "loguniform" and low <= 0:
            raise ConfigError(f"--search {key}={spec}: loguniform needs LOW > 0")
        return Dim(key, head, low=low, high=high)
    kind = "grid"
    if colon and head == "choice":
        kind, spec = "choice", rest
    raw = [v.strip() for v in spec.split(",")]
    if any(not v for v in raw):
        raise ConfigError(f"--search {key}={spec}: an empty value (values are separated by commas)")
    values = tuple(_coerce(key, v) for v in raw)
    if len(set(values)) != len(values):
        raise ConfigError(f"--search {key}={spec}: a value is listed twice")
    return Dim(key, kind, values=values)


# ----------------------------------------------------------------------------------- the paper's grids

@dataclass(frozen=True)
class PaperRow:
    """One row of a published table: the overrides that reproduce it and the published figure."""

    label: str
    overrides: Mapping[str, Any]
    published: float
    steps_factor: int = 1  # "twice the steps" rows train train.max_steps x this


@dataclass(frozen=True)
class PaperGrid:
    name: str
    job: str
    metric: str
    base: Mapping[str, Any]  # applied before your overrides (you may scale these, e.g. data.segment_len)
    rows: tuple[PaperRow, ...]
    source: str

    @property
    def row_keys(self) -> set[str]:
        return {k for row in self.rows for k in row.overrides}


def _mem(kind: str, tokens: int = 0, xl: int = 0, unroll: int = 0, **extra: Any) -> dict[str, Any]:
    return {"memory.kind": kind, "memory.num_tokens": tokens, "memory.xl_len": xl, "memory.bptt_unroll": unroll,
            **extra}


def _wt103_seg150() -> tuple[PaperRow, ...]:
    rows = [PaperRow("Baseline", _mem("none"), 29.95)]
    rows += [PaperRow(f"MemTr {m}", _mem("memtr", tokens=m), v)
             for m, v in ((10, 29.63), (25, 29.67), (75, 29.69), (150, 29.82))]
    rows += [PaperRow(f"Tr-XL {x}", _mem("xl", xl=x), v) for x, v in ((150, 24.12), (75, 24.68), (25, 25.57))]
    rows += [PaperRow(f"RMT 10 BPTT {k}", _mem("rmt", tokens=10, unroll=k), v)
             for k, v in enumerate((26.85, 25.92, 25.32, 25.04))]
    rows += [PaperRow(f"RMT 25 BPTT {k}", _mem("rmt", tokens=25, unroll=k), v)
             for k, v in enumerate((29.73, 24.91, 24.85))]
    rows += [PaperRow("Tr-XL + RMT 75+5 BPTT 3", _mem("rmt_xl", tokens=5, xl=75, unroll=3), 24.47),
             PaperRow("Tr-XL + RMT 150+10 BPTT 3, 2x steps", _mem("rmt_xl", tokens=10, xl=150, unroll=3), 23.99,
                      steps_factor=2)]
    return tuple(rows)


def _wt103_seg50() -> tuple[PaperRow, ...]:
    rows = [PaperRow("Baseline", _mem("none"), 39.05)]
    rows += [PaperRow(f"Tr-XL {x}", _mem("xl", xl=x), v) for x, v in
             ((1, 32.35), (5, 30.06), (10, 28.98), (25, 27.57), (50, 26.54), (100, 25.66), (200, 25.14))]
    for m, values in ((1, (31.33, 28.71, 28.44, 28.40)), (5, (30.32, 27.05, 26.83, 26.75, 26.67)),
                      (10, (30.69, 27.95, 26.62, 26.37, 26.25))):
        rows += [PaperRow(f"RMT {m} BPTT {k}", _mem("rmt", tokens=m, unroll=k), v) for k, v in enumerate(values)]
    return tuple(rows)


def _enwik8_seg128() -> tuple[PaperRow, ...]:
    rows = [PaperRow(f"Tr-XL {x}", _mem("xl", xl=x), v) for x, v in
            ((200, 1.140), (100, 1.178), (75, 1.196), (40, 1.230), (20, 1.261), (10, 1.283))]
    for m, pairs in ((5, ((1, 1.241), (2, 1.231))), (10, ((1, 1.240), (2, 1.228))),
                     (20, ((0, 1.301), (1, 1.229), (2, 1.222)))):
        rows += [PaperRow(f"RMT {m} BPTT {k}", _mem("rmt", tokens=m, unroll=k), v) for k, v in pairs]
    rows.append(PaperRow("Tr-XL 512, segment 512", _mem("xl", xl=512, **{"data.segment_len": 512}), 1.071))
    return tuple(rows)


# The task tables do not give memory sizes: RMT uses 10 memory tokens (the paper preset) and Tr-XL a
# cache of 10 states, the same number of memory vectors; RMT trains with full BPTT (window), as the
# algorithmic paper preset does.
_TASK_MEMORY = 10


def _task_rows(task: str, cases: Sequence[tuple[int, int, Mapping[str, float]]]) -> tuple[PaperRow, ...]:
    rows = []
    total_factor = 3 if task == "copy" else 2  # copy writes the source twice after it; reverse once
    for length, segments, published in cases:
        shape = {"data.task_length": length, "data.num_segments": segments,
                 "data.segment_len": total_factor * length // segments}
        for kind, value in published.items():
            mem = {"none": _mem("none"), "xl": _mem("xl", xl=_TASK_MEMORY),
                   "rmt": _mem("rmt", tokens=_TASK_MEMORY, unroll=-1)}[kind]
            name = {"none": "no memory", "xl": "Tr-XL", "rmt": "RMT"}[kind]
            rows.append(PaperRow(f"{task} {length} / {segments} segments, {name}", {**shape, **mem}, value))
    return tuple(rows)


GRIDS: dict[str, PaperGrid] = {
    "wt103_seg150": PaperGrid("wt103_seg150", "lm_wikitext", M.VAL_PPL, {"data.segment_len": 150}, _wt103_seg150(),
                              "PAPERS.md section 4: WikiText-103 test perplexity, segment 150"),
    "wt103_seg50": PaperGrid("wt103_seg50", "lm_wikitext", M.VAL_PPL, {"data.segment_len": 50}, _wt103_seg50(),
                             "PAPERS.md section 4: WikiText-103 test perplexity, segment 50"),
    "enwik8_seg128": PaperGrid("enwik8_seg128", "lm_enwik8", M.VAL_BPC, {"data.segment_len": 128},
                               _enwik8_seg128(), "PAPERS.md section 4: enwik8 test bpc, segment 128"),
    "copy_segments": PaperGrid(
        "copy_segments", "algorithmic", M.VAL_ACC, {"data.task": "copy", "memory.bptt_mode": "window"},
        _task_rows("copy", [(24, 9, {"none": 0.10, "xl": 0.28, "rmt": 1.0}), (120, 6, {"xl": 0.13, "rmt": 1.0}),
                            (120, 9, {"xl": 0.14, "rmt": 1.0})]),
        "PAPERS.md section 4: copy test accuracy (Tr-XL mean, RMT best seed)"),
    "reverse_segments": PaperGrid(
        "reverse_segments", "algorithmic", M.VAL_ACC, {"data.task": "reverse", "memory.bptt_mode": "window"},
        _task_rows("reverse", [(120, 4, {"xl": 0.61, "rmt": 1.0}), (120, 6, {"xl": 0.67, "rmt": 1.0})]),
        "PAPERS.md section 4: reverse test accuracy"),
}


# --------------------------------------------------------------------------------------- trial configs

def normalise_memory(cfg: Config) -> Config:
    """Memory size 0 is the no-memory baseline, and keys a memory kind ignores are zeroed so that equal
    trials are equal configs: ``num_tokens=0`` turns a kind with memory tokens into its
    ``without_tokens`` kind (rmt/memtr into none, rmt_xl into xl); keys the kind has no use for (tokens,
    cache, unroll and replay where no gradient crosses segments, the auxiliary loss) get their zero."""
    m = cfg.memory
    kind = memory_kind(m.kind)
    if m.num_tokens == 0 and kind.without_tokens:
        kind = memory_kind(kind.without_tokens)
    changes: dict[str, Any] = {"memory.kind": kind.name} if kind.name != m.kind else {}
    if not kind.memory_tokens:
        changes["memory.num_tokens"] = 0
    if not kind.xl_cache:
        changes["memory.xl_len"] = 0
    if not kind.recurrent:
        changes.update({"memory.bptt_unroll": 0, "memory.replay_backprop": False})
    if not kind.write_tokens:
        changes["memory.aux_loss_weight"] = 0.0
    return apply_overrides(cfg, changes) if changes else cfg


def trial_config(base: Mapping[str, Any], train_loop_config: Mapping[str, Any]) -> Config:
    """A trial's validated config: the sweep's base, then its grid point, then its sampled keys."""
    point = train_loop_config.get("point") or {}
    overrides = {**point.get("overrides", {}), **{k: v for k, v in train_loop_config.items() if k != "point"}}
    return validate(normalise_memory(apply_overrides(from_flat(base), overrides)))


def describe_point(cfg: Config, keys: Sequence[str]) -> str:
    """``rmt (10, 2)`` plus any other searched keys, for progress lines."""
    m = cfg.memory
    size = memory_kind(m.kind).memory_size(m.num_tokens, m.xl_len)
    flat = to_flat(cfg)
    extra = " ".join(f"{k}={flat[k]}" for k in keys if k not in MEMORY_KEYS)
    return f"{m.kind} ({size}, {m.bptt_unroll})" + (f" {extra}" if extra else "")


def metric_of(cfg: Config) -> tuple[str, str]:
    """The validation metric a workload is judged by, and whether lower is better."""
    return M.PRIMARY[validation_metric(cfg.data.dataset, hf_tokenizer=cfg.model.backbone == "hf")]


# ------------------------------------------------------------------------------------------ the spec

@dataclass
class SweepSpec:
    """Everything a sweep runs, JSON-serialisable (kept beside the Tune experiment for resumes)."""

    name: str
    job: str
    preset: str
    base: dict[str, Any]  # flat, validated; storage.path absolute, MLflow URI resolved
    points: list[dict[str, Any]]  # {"overrides": {...}, "label": str, "paper_row": str|None, "paper_value": ...}
    random: list[Dim]
    grid_keys: list[str]  # searched grid keys (or the paper grid's row keys)
    grid: str | None = None
    num_samples: int = 1
    scheduler: str = "none"
    asha_grace: int = 1
    asha_reduction: float = 2.0
    max_concurrent: int | None = None  # None = as many as the cluster's CPUs/GPUs hold
    metric: str = M.VAL_PPL
    mode: str = "min"
    dropped: int = 0  # grid points that normalised to an earlier point (the baseline, once)
    forward_env: dict[str, str] = field(default_factory=dict)

    @property
    def searched_keys(self) -> list[str]:
        return [*self.grid_keys, *(d.key for d in self.random)]

    @property
    def num_trials(self) -> int:
        return len(self.points) * self.num_samples

    def identity(self) -> dict[str, Any]:
        """What must match for a rerun to resume this sweep (not where it runs or logs)."""
        trained = {k: v for k, v in self.base.items() if k.split(".", 1)[0] not in ("storage", "mlflow", "scaling")}
        return {"job": self.job, "base": trained, "points": self.points, "random": [dataclasses.asdict(d) for d in
                                                                                      self.random],
                "num_samples": self.num_samples, "scheduler": self.scheduler, "asha_grace": self.asha_grace,
                "asha_reduction": self.asha_reduction}

    def experiment_name(self) -> str:
        return self.base["mlflow.experiment"] or self.job


USAGE = f"""usage: python jobs/sweep.py [--job {'|'.join(JOBS)}] [--preset smoke|paper] [--grid NAME]
                           [--search KEY=SPEC ...] [--num-samples N] [--scheduler none|asha]
                           [--asha-grace EVALS] [--asha-reduction F] [--max-concurrent N] [--name NAME]
                           [--section.key VALUE ...]

  --job            the workload swept, with its presets and overrides (default lm_wikitext; a --grid sets it)
  --preset         the job's preset plus the sweep's: smoke = 1 worker, 20 steps, memory {{0,4}} x unroll {{0,1,2}}
                   (4 trials); paper = the job's paper preset, memory {{0,1,5,10,25}} x unroll {{0,1,2,4}}
  --search         {SEARCH_SYNTAX};
                   repeat it for more keys; grids multiply, random keys are drawn per sample
  --num-samples    repeats of the whole grid, drawing the random keys anew each time (default 1)
  --grid           a paper table at your scale: {', '.join(GRIDS)}
  --scheduler      asha = stop trials early on the validation metric (after --asha-grace evaluations,
                   keeping the best 1/--asha-reduction at each rung); none (default) runs every trial out
  --max-concurrent trials at once (default: what the cluster holds; a trial takes scaling.num_workers x
                   scaling.cpus_per_worker CPUs + 1 for its driver)
  --name           the sweep's name; rerunning with the same --name and --storage.path resumes it
memory.num_tokens=0 is the no-memory baseline: memory.kind rmt/memtr become none (rmt_xl becomes xl).
"""


def _split_sweep_flags(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    flags: dict[str, Any] = {"search": []}
    names = {"job", "grid", "search", "num-samples", "scheduler", "max-concurrent", "name", "asha-grace",
             "asha-reduction"}
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in names:
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"--{key} needs a value")
                value = args[i + 1]
                i += 1
            if key == "search":
                flags["search"].append(value)
            else:
                flags[key] = value
        else:
            rest.append(arg)
            if arg.startswith("--") and "=" not in arg and i + 1 < len(args) and arg not in ("--help", "-h"):
                rest.append(args[i + 1])
                i += 1
        i += 1
    return flags, rest


def _int_flag(flags: Mapping[str, Any], name: str, default: int | None, minimum: int) -> int | None:
    if name not in flags:
        return default
    try:
        value = int(flags[name])
    except ValueError:
        raise ConfigError(f"--{name} must be an integer, got {flags[name]!r}") from None
    if value < minimum:
        raise ConfigError(f"--{name} must be >= {minimum}, got {value}")
    return value


def parse_sweep_args(argv: Sequence[str]) -> SweepSpec:
    """Flags -> a spec whose every grid point and range end is a valid config; ConfigError otherwise.
    Touches neither Ray, storage nor MLflow."""
    if "--help" in argv or "-h" in argv:
        print(USAGE)
        print(help_text(PRESETS["lm_wikitext"]))
        raise SystemExit(0)
    flags, rest = _split_sweep_flags(argv)
    grid = GRIDS.get(flags["grid"]) if "grid" in flags else None
    if "grid" in flags and grid is None:
        raise ConfigError(f"--grid must be one of {', '.join(GRIDS)}, got {flags['grid']!r}")
    job = flags.get("job", grid.job if grid else "lm_wikitext")
    if job not in PRESETS:
        raise ConfigError(f"--job must be one of {', '.join(JOBS)}, got {job!r}")
    if grid and job != grid.job:
        raise ConfigError(f"--job must be {grid.job} for --grid {grid.name}, got {job!r}")
    scheduler = flags.get("scheduler", "none")
    if scheduler not in ("none", "asha"):
        raise ConfigError(f"--scheduler must be one of none, asha, got {scheduler!r}")
    num_samples = _int_flag(flags, "num-samples", 1, 1)
    max_concurrent = _int_flag(flags, "max-concurrent", None, 1)
    asha_grace = _int_flag(flags, "asha-grace", 1, 1)
    try:
        asha_reduction = float(flags.get("asha-reduction", 2.0))
    except ValueError:
        raise ConfigError(f"--asha-reduction must be a number, got {flags['asha-reduction']!r}") from None
    if not asha_reduction > 1:
        raise ConfigError(f"--asha-reduction must be > 1, got {asha_reduction}")
    name = flags.get("name", "")
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise ConfigError(f"--name must be letters, digits, '_', '-', '.' (at most 100), got {name!r}")

    preset = "smoke"
    for i, arg in enumerate(rest):
        if arg == "--preset" and i + 1 < len(rest):
            preset = rest[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset not in SWEEP_PRESETS or preset not in PRESETS[job]:
        raise ConfigError(f"--preset must be one of {', '.join(p for p in SWEEP_PRESETS if p in PRESETS[job])}, "
                          f"got {preset!r}")
    sweep_preset = SWEEP_PRESETS[preset]
    presets = {p: {**PRESETS[job][p], **SWEEP_PRESETS[p]["overrides"], **(grid.base if grid else {})}
               for p in SWEEP_PRESETS if p in PRESETS[job]}
    aliases = {"task": "data.task"} if job == "algorithmic" else None
    cfg = parse_args(rest, presets, default_preset=preset, aliases=aliases)
    cfg = _resolve_locations(cfg, job)

    dims = [parse_search(s) for s in flags["search"]]
    seen: set[str] = set()
    for d in dims:
        if d.key in seen:
            raise ConfigError(f"--search {d.key} is given twice")
        seen.add(d.key)
    overridden = {a[2:].split("=", 1)[0] for a in rest if a.startswith("--") and not a.startswith("--preset")}
    if grid:
        clash = sorted((seen | overridden) & grid.row_keys)
        if clash:
            raise ConfigError(f"{clash[0]} is set by the rows of --grid {grid.name} (keys: "
                              f"{', '.join(sorted(grid.row_keys))}); drop it or sweep without --grid")
    elif not dims:
        dims = [Dim(k, "grid", values=tuple(v)) for k, v in sweep_preset["space"].items()]
    for d in dims:
        if d.key in overridden:
            raise ConfigError(f"--{d.key} is both overridden and searched; keep one")
    grid_dims = [d for d in dims if d.is_grid]
    random_dims = [d for d in dims if not d.is_grid]
    if num_samples > 1 and not random_dims:
        raise ConfigError("--num-samples > 1 repeats identical trials when no key is random; "
                          "search train.seed=0,1,2 to repeat over seeds")

    points, dropped = _expand(cfg, grid, grid_dims, random_dims)
    metric, mode = metric_of(cfg)
    if grid and grid.metric != metric:
        raise ConfigError(f"--grid {grid.name} compares {grid.metric}, but data.dataset={cfg.data.dataset} reports "
                          f"{metric}")
    from rmt_dist.train.driver import FORWARDED_ENV

    return SweepSpec(
        name=name or cfg.storage.run_name or f"sweep-{job}-{time.strftime('%Y%m%d-%H%M%S')}", job=job, preset=preset,
        base=to_flat(cfg), points=points, random=random_dims,
        grid_keys=sorted(grid.row_keys) if grid else [d.key for d in grid_dims], grid=grid.name if grid else None,
        num_samples=num_samples, scheduler=scheduler, asha_grace=asha_grace, asha_reduction=asha_reduction,
        max_concurrent=max_concurrent, metric=metric, mode=mode, dropped=dropped,
        forward_env={k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})


def _resolve_locations(cfg: Config, job: str) -> Config:
    """Absolute local paths and SQLite URI (trials run in other working directories, as a run's workers
    do); the MLflow experiment named (the job's, as for a single run)."""
    from rmt_dist.train.driver import resolve_locations

    return apply_overrides(resolve_locations(cfg), {"mlflow.experiment": cfg.mlflow.experiment or job})


def _expand(cfg: Config, grid: PaperGrid | None, grid_dims: Sequence[Dim],
            random_dims: Sequence[Dim]) -> tuple[list[dict[str, Any]], int]:
    """Grid points (normalised, deduplicated), each validated, and the random ranges' ends validated."""
    rows: list[PaperRow | None] = list(grid.rows) if grid else [None]
    points: list[dict[str, Any]] = []
    seen: set[str] = set()
    dropped = 0
    for row in rows:
        for values in itertools.product(*(d.values for d in grid_dims)):
            overrides = dict(row.overrides) if row else {}
            if row and row.steps_factor != 1:
                overrides["train.max_steps"] = cfg.train.max_steps * row.steps_factor
            overrides.update(zip((d.key for d in grid_dims), values))
            where = ", ".join(f"{k}={v}" for k, v in overrides.items())
            try:
                point_cfg = validate(normalise_memory(apply_overrides(cfg, overrides)))
                for d in random_dims:
                    for end in d.ends():
                        validate(normalise_memory(apply_overrides(point_cfg, {d.key: end})))
            except ConfigError as err:
                raise ConfigError(f"{err} (search point {where})" if where else str(err)) from None
            flat = to_flat(point_cfg)
            identity = json.dumps(flat, sort_keys=True, default=str)
            if identity in seen:
                dropped += 1
                continue
            seen.add(identity)
            # The point's overrides: what it set, plus whatever normalisation changed.
            base_flat = to_flat(cfg)
            effective = {k: flat[k] for k in flat if k in overrides or flat[k] != base_flat[k]}
            points.append({"overrides": effective, "label": describe_point(point_cfg, list(overrides)),
                           "paper_row": row.label if row else None, "paper_value": row.published if row else None})
    return points, dropped


def prepare(spec: SweepSpec) -> None:
    """Before Ray starts: storage is writable and every distinct data config loads (tokenized once, here).
    ConfigError / DataError (one line) otherwise."""
    from rmt_dist.storage import check_writable, resolve
    from rmt_dist.train.driver import prepare_data

    base = from_flat(spec.base)
    check_writable(resolve(base.storage))
    done: set[str] = set()
    for point in spec.points:
        cfg = trial_config(spec.base, {"point": point})
        key = json.dumps([dataclasses.asdict(cfg.data), cfg.train.batch_size, cfg.scaling.num_workers,
                          cfg.model.vocab_size], sort_keys=True)
        if key not in done:
            prepare_data(cfg)
            done.add(key)


# ------------------------------------------------------------------------------------------ the trial

def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def trial_storage(storage_cfg: Any, sweep_name: str) -> Any:
    """The Storage under which a sweep keeps its Tune experiment and its trials' Train runs."""
    from rmt_dist.storage import Storage, resolve

    root = resolve(storage_cfg)
    return Storage(uri=f"{root.uri}/{sweep_name}", filesystem=root.filesystem, ray_path=f"{root.ray_path}/{sweep_name}")


def child_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}/{trial_id}"


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")
_RAY_WRAPPERS = ("ray.train.WorkerGroupError", "ray.train.ControllerError", "ray.exceptions.RayTaskError",
                 "ray.exceptions.RayActorError", "ray.exceptions.ActorDiedError", "TrainingFailedError")


def _cause(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "worker process has died" in ln:
            kind = re.search(r"Worker exit type: (\w+)", ln)
            detail = re.search(r"Worker exit detail: (.*?\.)(\s|$)", ln)
            return "worker process died" + (f" ({kind.group(1)}" if kind else "") + (
                f": {detail.group(1)}" if detail else "") + (")" if kind else "")
    exceptions = [ln for ln in lines if _EXCEPTION_LINE.match(ln) and not ln.startswith(_RAY_WRAPPERS)]
    if exceptions:
        return exceptions[-1]
    wrapped = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return (wrapped or lines or [""])[-1]


def error_line(text: str) -> str:
    """One line for why a trial failed: the failing rank and its exception (``rank 0: torch.OutOfMemoryError:
    ...``) or how its worker died, else the last exception line; redacted, at most 400 characters."""
    from rmt_dist.storage import redact

    text = str(text)
    snippet = re.search(r"\[Rank (\d+) Error Snippet\]:(.*?)(?=\[Rank \d+ Error Snippet\]|\Z)", text, re.S)
    line = f"rank {snippet.group(1)}: {_cause(snippet.group(2))}" if snippet else _cause(text)
    return redact(" ".join(line.split()))[:400]


def run_trial(config: dict[str, Any]) -> None:
    """The Tune function of one trial: build the job's TorchTrainer for this grid point and fit it."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rmt_dist.train.driver import build_trainer, prepare_data

    sweep = config["sweep"]
    os.environ.update(sweep.get("env") or {})  # before build_trainer reads the forwarded names
    trial_id = ray.tune.get_context().get_trial_id()
    point = config["train_loop_config"].get("point") or {}
    cfg = prepare_data(trial_config(sweep["base"], config["train_loop_config"]))
    run_id = None
    if cfg.mlflow.enabled:
        from rmt_dist.tracking import open_run

        tags = {R.SWEEP_TAG: sweep["name"], R.ROLE_TAG: "trial", R.TRIAL_TAG: trial_id,
                "rmt_dist.point": describe_point(cfg, sweep.get("searched", []))}
        if point.get("paper_row"):
            tags.update({R.PAPER_ROW_TAG: point["paper_row"], R.PAPER_VALUE_TAG: str(point["paper_value"])})
        run_id = open_run(cfg, sweep["job"], child_run_name(sweep["name"], trial_id), sweep.get("parent_run_id"),
                          tags=tags)
    storage = trial_storage(cfg.storage, sweep["name"])
    finished = _finished_train_metrics(storage, f"train_{trial_id}", cfg.train.max_steps)
    if finished is not None:
        # Interrupted after its Train run ended but before Tune saw the trial end: nothing to train; give
        # Tune the run's final report (it restarted this trial with an empty result history).
        ray.tune.report(finished)
        if run_id:
            from rmt_dist.tracking import finish_run

            finish_run(cfg, run_id, "FINISHED", {"trial_id": trial_id, **finished})
        return
    trainer = build_trainer(cfg, storage, f"train_{trial_id}",
                            {"mlflow_run_id": run_id},
                            callbacks=[TuneReportCallback(), _trial_recorder(sweep["name"], trial_id)])
    try:
        result = trainer.fit()
    except BaseException as err:
        # A trial the scheduler stopped was tagged stopped early by the driver before it aborted the
        # trial's Train controller (which is what raised here): the driver closes that run.
        run = _client(cfg).get_run(run_id) if run_id else None
        if run and run.info.status == "RUNNING" and run.data.tags.get(R.STOPPED_TAG) != "true":
            _close_run(cfg, run_id, "FAILED", error=error_line(str(err)))
        raise
    if run_id:
        from rmt_dist.tracking import finish_run

        finish_run(cfg, run_id, "FINISHED", {"trial_id": trial_id, **dict(result.metrics or {})})


# ------------------------------------------------- stopped trials give their workers back (ray#54305)
#
# When Tune stops a trial (ASHA) it kills the trial's actor; the trial's Train controller dies with it,
# but the placement group holding the trial's workers belongs to the job, not to the controller. Ray
# 2.60 removes it from a detached PlacementGroupCleaner that asks the State API whether the controller
# is alive; without the dashboard (include_dashboard=False, as our local Ray and the test fixtures run)
# that query fails forever, the CPUs stay reserved and the next trial waits for workers forever.
# So each trial's controller records itself and its placement groups in a registry actor of the sweep,
# and the sweep's driver, when Tune stops or loses a trial, aborts that controller (which shuts its
# worker group down and removes the placement group, as Ctrl-C on a job does) and removes any
# placement group still standing.

def _registry_name(sweep_name: str) -> str:
    return f"rmt_dist_sweep_registry:{sweep_name}"


class SweepRegistry:
    """Per trial: its Train controller's handle and the placement groups of its worker groups."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def record(self, trial_id: str, controller: Any = None, placement_group: Any = None) -> None:
        entry = self.entries.setdefault(trial_id, {"controller": None, "placement_groups": []})
        if controller is not None:
            entry["controller"] = controller
        if placement_group is not None:
            entry["placement_groups"].append(placement_group)

    def take(self, trial_id: str) -> dict[str, Any] | None:
        return self.entries.pop(trial_id, None)


def _trial_recorder(sweep_name: str, trial_id: str) -> Any:
    """A Train controller callback (Ray's internal callback API, which RunConfig accepts for such
    workarounds) that records the controller and each worker group's placement group."""
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class TrialRecorder(ControllerCallback, WorkerGroupCallback):
        def __init__(self, registry: str, trial: str) -> None:
            self.registry, self.trial = registry, trial

        def _record(self, **what: Any) -> None:
            try:
                ray.get(ray.get_actor(self.registry).record.remote(self.trial, **what), timeout=30)
            except Exception:  # no registry (a trial run outside a sweep): nothing to clean up later
                pass

        def after_controller_start(self, train_run_context: Any) -> None:
            self._record(controller=ray.get_runtime_context().current_actor)

        def after_worker_group_start(self, worker_group: Any) -> None:
            self._record(placement_group=worker_group.get_worker_group_state().placement_group_handle.placement_group)

    return TrialRecorder(_registry_name(sweep_name), trial_id)


def release_trial(sweep_name: str, trial_id: str, abort: bool) -> int:
    """Give a finished, stopped or failed trial's reservation back: abort its Train controller (when
    ``abort``) and remove its placement groups that are still there. Returns how many were removed."""
    import ray
    from ray.util.placement_group import placement_group_table, remove_placement_group

    try:
        entry = ray.get(ray.get_actor(_registry_name(sweep_name)).take.remote(trial_id), timeout=30)
    except Exception:
        return 0
    if not entry:
        return 0
    if abort and entry["controller"] is not None:
        try:
            ray.get(entry["controller"].abort.remote(), timeout=120)
        except Exception:  # it exits inside abort, or it is already dead: either is fine
            pass
    removed = 0
    for pg in entry["placement_groups"]:
        try:
            if placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
                remove_placement_group(pg)
                removed += 1
        except Exception:
            pass
    return removed


def _finished_train_metrics(storage: Any, name: str, max_steps: int) -> dict[str, Any] | None:
    """The last report of the Train run ``name`` if it already reached ``max_steps``, else None."""
    from ray.train.v2.api.result import Result

    try:
        metrics = Result.from_path(f"{storage.ray_path}/{name}", storage_filesystem=storage.filesystem).metrics
    except Exception:  # no such run yet (the usual case)
        return None
    return dict(metrics) if metrics and metrics.get(M.STEP, 0) >= max_steps else None


def _client(cfg: Config) -> Any:
    import mlflow

    from rmt_dist.tracking import tracking_uri

    return mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))


def _close_run(cfg: Config, run_id: str, status: str, error: str = "", stopped: bool = False) -> None:
    from rmt_dist.tracking import finish_run

    client = _client(cfg)
    if error:
        client.set_tag(run_id, R.ERROR_TAG, error)
    if stopped:
        client.set_tag(run_id, R.STOPPED_TAG, "true")
    finish_run(cfg, run_id, status, {"error": error} if error else {"stopped_early": stopped})


def _find_child(cfg: Config, sweep_name: str, trial_id: str) -> Any:
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        return None
    from rmt_dist.tracking import RUN_NAME_TAG

    runs = client.search_runs([exp.experiment_id], max_results=1, filter_string=(
        f"tags.`{RUN_NAME_TAG}` = '{child_run_name(sweep_name, trial_id)}'"))
    return runs[0] if runs else None


# Trials that really ended (done, stopped early, failed), kept beside the experiment across resumes.
# Tune marks the trials it was running when interrupted (Ctrl-C) TERMINATED in memory too, without
# the on_trial_complete event, so its statuses cannot tell an interrupted trial from a finished one.
ENDED_FILE = "ended_trials.json"
# Layout under storage.path/<sweep name>/: sweep.json, ended_trials.json and report/ (ours), tune/ (the Tune
# experiment; Tune re-uploads its own directory from a staging copy, so our files live beside it), and
# train_<trial id>/ (each trial's Train run and checkpoints).
TUNE_DIR = "tune"


def read_ended(storage: Any) -> dict[str, str]:
    text = _read_text(storage, f"{storage.ray_path}/{ENDED_FILE}")
    return json.loads(text) if text else {}


class SweepCallback(TuneCallback):
    """On the sweep's driver: one progress line per trial event; closes the MLflow run of a trial
    that Tune stopped (ASHA) or lost (its driver died) before it could close it itself."""

    def __init__(self, spec: SweepSpec) -> None:
        self.name, self.base, self.metric = spec.name, spec.base, spec.metric
        self.searched, self.total = spec.searched_keys, spec.num_trials

    def _ended(self, trial: Any, status: str) -> None:
        storage = trial_storage(from_flat(self.base).storage, self.name)
        ended = read_ended(storage)
        ended[trial.trial_id] = status
        _write_text(storage, f"{storage.ray_path}/{ENDED_FILE}", json.dumps(ended, indent=1))

    def _cfg(self, trial: Any) -> Config | None:
        try:
            return trial_config(self.base, trial.config["train_loop_config"])
        except ConfigError:
            return None

    def _say(self, trials: Sequence[Any], trial: Any, text: str, ended: bool = False) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") or (ended and t is trial) for t in trials)
        cfg = self._cfg(trial)
        row = (trial.config["train_loop_config"].get("point") or {}).get("paper_row")
        what = f"[{row}]" if row else describe_point(cfg, self.searched) if cfg else ""
        print(f"[sweep {done}/{self.total}] trial {trial.trial_id} {what}: {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trials, trial, "started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        cfg = self._cfg(trial)
        if cfg and self.metric in result:
            self._say(trials, trial, f"step {result.get(M.STEP)}/{cfg.train.max_steps} "
                                     f"{self.metric} {result[self.metric]:.4g}")
        if result.get("done") and cfg and result.get(M.STEP, 0) < cfg.train.max_steps:
            # Tune sets done on the result it is about to stop the trial on (the scheduler's STOP), and
            # only then stops the trial. Stop its Train run now, before its workers train (and log) on.
            self.stopping = getattr(self, "stopping", set()) | {trial.trial_id}
            run = _find_child(cfg, self.name, trial.trial_id) if cfg.mlflow.enabled else None
            if run is not None:  # tagged before the abort makes the trial's fit() raise (see run_trial)
                _client(cfg).set_tag(run.info.run_id, R.STOPPED_TAG, "true")
            release_trial(self.name, trial.trial_id, abort=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cfg = self._cfg(trial)
        step = (trial.last_result or {}).get(M.STEP, 0)
        stopped = trial.trial_id in getattr(self, "stopping", set())
        release_trial(self.name, trial.trial_id, abort=False)  # anything left of a stopped trial
        run = _find_child(cfg, self.name, trial.trial_id) if cfg and cfg.mlflow.enabled else None
        if run is not None and run.info.status == "RUNNING":
            _close_run(cfg, run.info.run_id, "FINISHED", stopped=stopped)
        self._ended(trial, "stopped" if stopped else "done")
        self._say(trials, trial, f"stopped early by ASHA after step {step}" if stopped else "done", ended=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        local = Path(trial.error_file) if trial.error_file else None
        text = local.read_text() if local and local.exists() else (trial.get_error() or "")
        line = error_line(text) or "failed"
        cfg = self._cfg(trial) or from_flat(self.base)
        if cfg.mlflow.enabled:
            run = _find_child(cfg, self.name, trial.trial_id)
            if run is not None and run.info.status == "RUNNING":
                _close_run(cfg, run.info.run_id, "FAILED", error=line)
        release_trial(self.name, trial.trial_id, abort=True)
        self._ended(trial, "failed")
        where = f" (details: {trial.path}/error.txt)" if trial.path else ""
        self._say(trials, trial, f"FAILED: {line}{where}", ended=True)


# ------------------------------------------------------------------------------------------ the sweep

@dataclass
class SweepOutcome:
    spec: SweepSpec
    records: list[R.TrialRecord]
    interrupted: bool
    parent_run_id: str | None
    report_dir: str | None
    resumed: bool


def _init_ray(spec: SweepSpec, per_trial_cpus: int) -> None:
    """The driver's Ray start-up; a local Ray gets a logical CPU per concurrent trial's driver too (each
    trial's driver waits while its workers compute)."""
    from rmt_dist.train.driver import init_ray

    cores = os.cpu_count() or 1
    base = from_flat(spec.base)
    want = spec.max_concurrent or max(1, cores // (base.scaling.num_workers * base.scaling.cpus_per_worker))
    init_ray(base, num_cpus=max(cores, min(want, spec.num_trials) * per_trial_cpus))


def _per_trial(spec: SweepSpec) -> tuple[int, int]:
    """CPUs and GPUs one trial holds at most: its Train workers plus its driver's CPU."""
    cpus, gpus = 0, 0
    for point in spec.points:
        s = trial_config(spec.base, {"point": point}).scaling
        cpus = max(cpus, s.num_workers * s.cpus_per_worker + TRIAL_CPU)
        gpus = max(gpus, s.num_workers if s.use_gpu else 0)
    return cpus, gpus


def concurrency(spec: SweepSpec, resources: Mapping[str, float], cpus: int, gpus: int) -> int:
    """--max-concurrent, else as many trials as the cluster's CPUs (and GPUs) hold at once (at least 1).

    Tune sees only a trial's driver CPU; its workers are placed later by Train, so without this cap
    Tune would start trials whose workers then wait for each other's resources."""
    if spec.max_concurrent:
        return spec.max_concurrent
    fits = int(resources.get("CPU", 0) // cpus)
    if gpus:
        fits = min(fits, int(resources.get("GPU", 0) // gpus))
    return max(1, min(fits, spec.num_trials))


def _read_text(storage: Any, path: str) -> str | None:
    import pyarrow.fs as pafs

    fs = storage.filesystem or pafs.LocalFileSystem()
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.readall().decode()


def _write_text(storage: Any, path: str, text: str) -> None:
    import pyarrow.fs as pafs

    fs = storage.filesystem or pafs.LocalFileSystem()
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _parent_params(spec: SweepSpec) -> dict[str, Any]:
    searched = set(spec.searched_keys)
    params = {k: v for k, v in spec.base.items() if k not in searched}
    for key in spec.grid_keys:
        values = sorted((json.loads(v) for v in {json.dumps(p["overrides"].get(key, spec.base[key]))
                                                 for p in spec.points}), key=lambda v: (type(v).__name__, v))
        params[f"{R.SEARCH_PARAM_PREFIX}{key}"] = ",".join(str(v) for v in values)[:6000]
    for d in spec.random:
        params[f"{R.SEARCH_PARAM_PREFIX}{d.key}"] = d.describe()
    params.update({"sweep.grid": spec.grid or "", "sweep.num_trials": spec.num_trials,
                   "sweep.num_samples": spec.num_samples, "sweep.scheduler": spec.scheduler})
    return params


def _open_parent(spec: SweepSpec, saved: Mapping[str, Any] | None) -> str | None:
    cfg = from_flat(spec.base)
    if not cfg.mlflow.enabled:
        return None
    if saved and saved.get("parent_run_id"):
        client = _client(cfg)
        client.update_run(saved["parent_run_id"], status="RUNNING")
        return saved["parent_run_id"]
    from rmt_dist.tracking import open_run

    run_id = open_run(cfg, spec.job, spec.name, params=_parent_params(spec), tags={
        R.SWEEP_TAG: spec.name, R.ROLE_TAG: "parent", R.METRIC_TAG: spec.metric, R.MODE_TAG: spec.mode,
        "rmt_dist.grid": spec.grid or ""})
    client = _client(cfg)
    client.log_text(run_id, json.dumps({"grid": spec.grid, "points": spec.points,
                                        "random": [dataclasses.asdict(d) for d in spec.random],
                                        "num_samples": spec.num_samples, "scheduler": spec.scheduler,
                                        "metric": spec.metric, "mode": spec.mode}, indent=1, default=str),
                    "search_space.json")
    return run_id


def param_space(spec: SweepSpec, parent_run_id: str | None) -> dict[str, Any]:
    from ray import tune

    loop: dict[str, Any] = {"point": tune.grid_search(spec.points)}
    loop.update({d.key: d.domain() for d in spec.random})
    return {"train_loop_config": loop,
            "sweep": {"name": spec.name, "job": spec.job, "base": spec.base, "parent_run_id": parent_run_id,
                      "searched": spec.searched_keys, "env": spec.forward_env}}


def records_from_results(grid: Any, spec: SweepSpec, ended: Mapping[str, str]) -> list[R.TrialRecord]:
    """One record per Tune trial, from the ResultGrid (its reported rows, error, config); its status from
    ``ended`` (what the sweep's callback saw end), ``running`` if it did not end."""
    records = []
    for result in grid:
        config = result.config or {}
        loop = config.get("train_loop_config", {})
        point = loop.get("point") or {}
        try:
            cfg = trial_config(spec.base, loop)
        except ConfigError:
            cfg = from_flat(spec.base)
        df = result.metrics_dataframe
        rows = df.to_dict("records") if df is not None and len(df) else []
        figures = R.summarise(rows, spec.metric, spec.mode)
        trial_id = str((result.metrics or {}).get("trial_id") or Path(str(result.path)).name.removeprefix("trial_"))
        status = ended.get(trial_id, "running")
        flat = to_flat(cfg)
        records.append(R.TrialRecord(
            trial_id=str(trial_id), kind=cfg.memory.kind, num_tokens=cfg.memory.num_tokens, xl_len=cfg.memory.xl_len,
            bptt_unroll=cfg.memory.bptt_unroll, status=status, metric=spec.metric,
            swept={k: flat[k] for k in spec.searched_keys}, paper_row=point.get("paper_row"),
            paper_value=point.get("paper_value"), error=error_line(str(result.error)) if result.error else "",
            **figures))
    return records


# Ray Tune copies these from the driver's environment into every trial's runtime_env, and Ray's
# runtime-env agent logs runtime envs in full: the secret would land in Ray's log files.
_TUNE_PROPAGATED_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def _credentials_hidden_from_tune() -> Iterator[None]:
    """Keep AWS credentials out of Tune's trial runtime_env (and so out of Ray's logs). A local Ray
    was started from this process and its workers inherited them already; cluster nodes use their
    own (instance profile, Kubernetes secrets)."""
    saved = {k: os.environ.pop(k) for k in _TUNE_PROPAGATED_CREDENTIALS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def run_sweep(spec: SweepSpec) -> SweepOutcome:
    """Run (or resume) the sweep; write its table and plots; close its MLflow parent run."""
    import ray
    from ray import tune

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our own lines say where to look
    storage = trial_storage(from_flat(spec.base).storage, spec.name)
    state_path = f"{storage.ray_path}/sweep.json"
    saved_text = _read_text(storage, state_path)
    saved = json.loads(saved_text) if saved_text else None
    if saved and saved["identity"] != json.loads(json.dumps(spec.identity(), default=str)):
        raise ConfigError(f"--name {spec.name}: a sweep of that name in {storage.uri} has a different search space or "
                          "config; rerun its own command to resume it, or pick another --name")
    parent_run_id = _open_parent(spec, saved)
    if not saved:
        _write_text(storage, state_path, json.dumps({"identity": spec.identity(), "parent_run_id": parent_run_id,
                                                     "name": spec.name}, indent=1, default=str))

    cpus, gpus = _per_trial(spec)
    _init_ray(spec, cpus)
    limit = concurrency(spec, ray.cluster_resources(), cpus, gpus)
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPU})
    tune_path = f"{storage.ray_path}/{TUNE_DIR}"
    restorable = tune.Tuner.can_restore(tune_path, storage_filesystem=storage.filesystem)
    print(f"sweep {spec.name}: {spec.num_trials} trials of {spec.job} "
          f"({'resuming' if restorable else 'new'}; {limit} at a time, {cpus} CPUs"
          f"{f' + {gpus} GPUs' if gpus else ''} each; judged by {spec.metric})"
          + (f"; {spec.dropped} grid points were the baseline again and run once" if spec.dropped else ""), flush=True)
    if restorable:
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, storage_filesystem=storage.filesystem)
    else:
        scheduler = None
        if spec.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            evals = math.ceil(from_flat(spec.base).train.max_steps / from_flat(spec.base).train.eval_interval)
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(evals, spec.asha_grace),
                                      grace_period=spec.asha_grace, reduction_factor=spec.asha_reduction,
                                      stop_last_trials=False)
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec, parent_run_id),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                        num_samples=spec.num_samples, max_concurrent_trials=limit,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=storage.ray_path,
                                      storage_filesystem=storage.filesystem, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                      callbacks=[SweepCallback(spec)]))
    registry = ray.remote(num_cpus=0)(SweepRegistry).options(name=_registry_name(spec.name),
                                                              get_if_exists=True).remote()
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0: no Tune tables; our callback prints one line per event
    import logging

    # A failed trial is one line from our callback (and its error.txt), not Tune's traceback on stderr.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with _credentials_hidden_from_tune():
            grid = tuner.fit()
    finally:
        ray.kill(registry)
    ended = read_ended(storage)
    records = records_from_results(grid, spec, ended)
    # Trials Tune had not generated yet are missing from the grid (it generates them as slots free up).
    interrupted = len(records) < spec.num_trials or any(r.status == "running" for r in records)
    cfg = from_flat(spec.base)
    if parent_run_id and not interrupted:
        # MLflow holds every trial's whole history, also across resumes (Tune restarts an interrupted
        # trial with an empty result history): the table from there is the one `rmt_dist.report` prints.
        client = _client(cfg)
        from_mlflow, _, _ = R.records_from_mlflow(client, client.get_run(parent_run_id))
        if sorted(r.trial_id for r in from_mlflow) == sorted(r.trial_id for r in records):
            for r in from_mlflow:
                r.status = ended.get(r.trial_id, r.status)
            records = from_mlflow
    if interrupted:
        if parent_run_id:
            _client(cfg).set_terminated(parent_run_id, status="KILLED")
        return SweepOutcome(spec, records, True, parent_run_id, None, bool(restorable))
    report_dir = _finish(spec, records, parent_run_id, storage)
    return SweepOutcome(spec, records, False, parent_run_id, report_dir, bool(restorable))


def _finish(spec: SweepSpec, records: list[R.TrialRecord], parent_run_id: str | None, storage: Any) -> str:
    """Table + plots into the sweep's directory (local storage) and the parent run; best trial on the parent."""
    cfg = from_flat(spec.base)
    title = f"sweep {spec.name} ({spec.job}" + (f", grid {spec.grid}" if spec.grid else "") + ")"
    with tempfile.TemporaryDirectory(prefix="rmt_sweep_") as tmp:
        files = R.write_report(records, spec.mode, tmp, title)
        if storage.filesystem is None:
            out = Path(storage.uri) / "report"
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                (out / f.name).write_bytes(f.read_bytes())
            report_dir = str(out)
        else:
            import pyarrow.fs as pafs

            storage.filesystem.create_dir(f"{storage.ray_path}/report", recursive=True)
            for f in files:
                pafs.copy_files(str(f), f"{storage.ray_path}/report/{f.name}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=storage.filesystem)
            report_dir = f"{storage.uri}/report"
        if parent_run_id:
            client = _client(cfg)
            for f in files:
                client.log_artifact(parent_run_id, str(f))
            ranked = [r for r in R.sort_records(records, spec.mode) if r.best is not None]
            summary: dict[str, Any] = {"trials": len(records),
                                       **{s: sum(r.status == s for r in records) for s in R.STATUSES}}
            if ranked:
                best = ranked[0]
                child = _find_child(cfg, spec.name, best.trial_id)
                client.set_tag(parent_run_id, "rmt_dist.best_trial", best.trial_id)
                client.set_tag(parent_run_id, "rmt_dist.best_config", " ".join([f"{best.kind} {best.label}", *(
                    f"{k}={v}" for k, v in best.swept.items() if k not in MEMORY_KEYS)]))
                if child is not None:
                    client.set_tag(parent_run_id, "rmt_dist.best_run_id", child.info.run_id)
                client.log_metric(parent_run_id, f"best_{spec.metric}", best.best)
                client.log_text(parent_run_id, json.dumps(best.swept | {"trial_id": best.trial_id,
                                                                        spec.metric: best.best}, indent=1,
                                                          default=str), "best_trial.json")
                summary.update({"best_trial": best.trial_id, f"best_{spec.metric}": best.best})
            from rmt_dist.tracking import finish_run

            finish_run(cfg, parent_run_id, "FINISHED", summary)
    return report_dir


def main(argv: Sequence[str] | None = None) -> int:
    """``jobs/sweep.py``: flags -> checks (exit 2 on bad input) -> the sweep -> its table."""
    from rmt_dist.config import exit_on_config_error
    from rmt_dist.data import DataError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        spec = parse_sweep_args(argv)
        prepare(spec)
    except (ConfigError, DataError) as err:
        exit_on_config_error(ConfigError(str(err)))
    try:
        outcome = run_sweep(spec)
    except ConfigError as err:
        exit_on_config_error(err)
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command (--name {spec.name}) to resume", file=sys.stderr)
        return 130
    except Exception as err:
        from rmt_dist.storage import redact

        print(f"error: sweep failed: {redact(' '.join(str(err).split())[:600]) or type(err).__name__}",
              file=sys.stderr)
        return 1
    finished = [r for r in outcome.records if r.status in ("done", "stopped", "failed")]
    if outcome.interrupted:
        print(f"interrupted with {len(finished)} of {spec.num_trials} trials finished: rerun the same command "
              f"(--name {spec.name}) to run the rest", file=sys.stderr)
        return 130
    print(R.to_text(outcome.records, spec.mode), end="")
    print(f"report: {outcome.report_dir} (results.csv, results.md, tradeoff.png, curves.png)")
    if outcome.parent_run_id:
        from rmt_dist.tracking import tracking_uri

        uri = tracking_uri(from_flat(spec.base))
        print(f"mlflow parent run: {outcome.parent_run_id} | see it: "
              + (uri if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}")
              + f" | table: python -m rmt_dist.report --experiment {spec.experiment_name()} --sweep {spec.name}")
    return 0 if any(r.status != "failed" for r in outcome.records) else 1
