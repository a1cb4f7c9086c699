"""The sweep's command line, read by ``config.read_args`` with the sweep's own flags, and every check
before Ray starts: each grid point and range end a valid config, storage writable, data prepared."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Sequence

from rmt_dist.config import CommandLine, Config, ConfigError, apply_overrides, config_from_args, from_flat, help_text, \
    read_args, to_flat
from rmt_dist.presets import PRESETS
from rmt_dist.storage import check_writable, resolve
from rmt_dist.sweep.paper_grids import GRIDS
from rmt_dist.sweep.space import SEARCH_SYNTAX, SWEEP_PRESETS, Dim, expand, metric_of, parse_search, trial_config
from rmt_dist.sweep.spec import SweepSpec
from rmt_dist.train.driver import FORWARDED_ENV, prepare_data, resolve_locations

JOBS = tuple(PRESETS)
# The sweep's own flags (the rest are --preset and dotted config overrides); --search may repeat.
SWEEP_FLAGS = ("job", "grid", "search", "num-samples", "scheduler", "max-concurrent", "name", "asha-grace",
               "asha-reduction")

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


def _flag(line: CommandLine, name: str, default: str | None = None) -> str | None:
    """The value of a sweep flag given once (the last one given wins), else ``default``."""
    return line.extra[name][-1] if name in line.extra else default


def _int_flag(line: CommandLine, name: str, default: int | None, minimum: int) -> int | None:
    text = _flag(line, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--{name} must be an integer, got {text!r}") from None
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
    line = read_args(argv, extra=SWEEP_FLAGS)
    grid_name = _flag(line, "grid")
    grid = GRIDS.get(grid_name) if grid_name is not None else None
    if grid_name is not None and grid is None:
        raise ConfigError(f"--grid must be one of {', '.join(GRIDS)}, got {grid_name!r}")
    job = _flag(line, "job", grid.job if grid else "lm_wikitext")
    if job not in PRESETS:
        raise ConfigError(f"--job must be one of {', '.join(JOBS)}, got {job!r}")
    if grid and job != grid.job:
        raise ConfigError(f"--job must be {grid.job} for --grid {grid.name}, got {job!r}")
    scheduler = _flag(line, "scheduler", "none")
    if scheduler not in ("none", "asha"):
        raise ConfigError(f"--scheduler must be one of none, asha, got {scheduler!r}")
    num_samples = _int_flag(line, "num-samples", 1, 1)
    max_concurrent = _int_flag(line, "max-concurrent", None, 1)
    asha_grace = _int_flag(line, "asha-grace", 1, 1)
    try:
        asha_reduction = float(_flag(line, "asha-reduction", "2"))
    except ValueError:
        raise ConfigError(f"--asha-reduction must be a number, got {_flag(line, 'asha-reduction')!r}") from None
    if not asha_reduction > 1:
        raise ConfigError(f"--asha-reduction must be > 1, got {asha_reduction}")
    name = _flag(line, "name", "")
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise ConfigError(f"--name must be letters, digits, '_', '-', '.' (at most 100), got {name!r}")

    # The job's presets, each with the sweep preset's overrides and the paper grid's base on top.
    presets = {p: {**PRESETS[job][p], **SWEEP_PRESETS[p]["overrides"], **(grid.base if grid else {})}
               for p in SWEEP_PRESETS if p in PRESETS[job]}
    aliases = {"task": "data.task"} if job == "algorithmic" else None
    cfg = _resolve_locations(config_from_args(line, presets, default_preset="smoke", aliases=aliases), job)
    preset = line.preset or "smoke"

    dims = [parse_search(s) for s in line.extra.get("search", [])]
    seen: set[str] = set()
    for d in dims:
        if d.key in seen:
            raise ConfigError(f"--search {d.key} is given twice")
        seen.add(d.key)
    overridden = {key for key, _ in line.overrides}
    if grid:
        clash = sorted((seen | overridden) & grid.row_keys)
        if clash:
            raise ConfigError(f"{clash[0]} is set by the rows of --grid {grid.name} (keys: "
                              f"{', '.join(sorted(grid.row_keys))}); drop it or sweep without --grid")
    elif not dims:
        dims = [Dim(k, "grid", values=tuple(v)) for k, v in SWEEP_PRESETS[preset]["space"].items()]
    for d in dims:
        if d.key in overridden:
            raise ConfigError(f"--{d.key} is both overridden and searched; keep one")
    grid_dims = [d for d in dims if d.is_grid]
    random_dims = [d for d in dims if not d.is_grid]
    if num_samples > 1 and not random_dims:
        raise ConfigError("--num-samples > 1 repeats identical trials when no key is random; "
                          "search train.seed=0,1,2 to repeat over seeds")

    points, dropped = expand(cfg, grid, grid_dims, random_dims)
    metric, mode = metric_of(cfg)
    if grid and grid.metric != metric:
        raise ConfigError(f"--grid {grid.name} compares {grid.metric}, but data.dataset={cfg.data.dataset} reports "
                          f"{metric}")
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
    return apply_overrides(resolve_locations(cfg), {"mlflow.experiment": cfg.mlflow.experiment or job})


def prepare(spec: SweepSpec) -> None:
    """Before Ray starts: storage is writable and every distinct data config loads (tokenized once, here).
    ConfigError / DataError (one line) otherwise."""
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
