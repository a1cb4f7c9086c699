"""The search space: ``--search`` syntax, the sweep presets' spaces, and the grid expanded into trial
configs (memory size 0 is the no-memory baseline; equal trials are equal configs and run once)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from rmt_dist.config import KEY_TYPES, Config, ConfigError, _coerce, apply_overrides, from_flat, \
    to_flat, validate
from rmt_dist.memory_kinds import memory_kind
from rmt_dist.sweep.paper_grids import PaperGrid, PaperRow
from rmt_dist.train import metrics as M
from rmt_dist.workload_kinds import validation_metric

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
RANGES = ("uniform", "loguniform", "randint")


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
    if colon and head in RANGES:
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


def expand(cfg: Config, grid: PaperGrid | None, grid_dims: Sequence[Dim],
           random_dims: Sequence[Dim]) -> tuple[list[dict[str, Any]], int]:
    """Grid points (normalised, deduplicated), each validated, and the random ranges' ends validated;
    returns the points and how many grid points were dropped as equal to an earlier one."""
    rows: list[PaperRow | None] = list(grid.rows) if grid else [None]
    base_flat = to_flat(cfg)
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
            effective = {k: flat[k] for k in flat if k in overrides or flat[k] != base_flat[k]}
            points.append({"overrides": effective, "label": describe_point(point_cfg, list(overrides)),
                           "paper_row": row.label if row else None, "paper_value": row.published if row else None})
    return points, dropped
