"""Sweep results: one table (CSV, Markdown, terminal), the quality-vs-memory plot with its Pareto frontier,
and the validation curves of every trial.

The sweep writes these as artifacts of its MLflow parent run when it ends (``rmt_dist.sweep``); this
module also reads them back from MLflow for people who live in a shell::

    python -m rmt_dist.report --experiment lm_wikitext             # the latest sweep of that job, best first
    python -m rmt_dist.report --experiment lm_wikitext --sweep NAME --csv out.csv

A trial is one training run. Its figures: the best validation metric over its evaluations (lowest
perplexity / bits per character, highest accuracy), the highest ``peak_mem_bytes`` it reported, its
``memory_state_bytes`` and its mean ``tokens_per_s`` (the first evaluation interval, which includes
start-up, is left out when there are later ones). Where a named paper grid was swept, each trial sits
beside the published figure of its row (../shared/PAPERS.md section 4) with the difference.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rmt_dist.config import KEY_TYPES, Config, _coerce
from rmt_dist.memory_kinds import MEMORY_KINDS
from rmt_dist.tracking import ERROR_TAG, METRIC_TAG, MODE_TAG, PAPER_ROW_TAG, PAPER_VALUE_TAG, ROLE_TAG, \
    SEARCH_PARAM_PREFIX, STOPPED_TAG, SWEEP_TAG, TRIAL_TAG, tracking_uri
from rmt_dist.train import metrics as M

STATUSES = ("done", "stopped", "failed", "running")


@dataclass
class TrialRecord:
    """One trial's row: its memory configuration, outcome and figures."""

    trial_id: str
    kind: str
    num_tokens: int
    xl_len: int
    bptt_unroll: int
    status: str  # done | stopped (early, by the scheduler) | failed | running (unfinished)
    metric: str  # val_ppl | val_bpc | val_acc
    best: float | None = None
    peak_mem_bytes: float | None = None
    memory_state_bytes: float | None = None
    tokens_per_s: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    swept: dict[str, Any] = field(default_factory=dict)  # the searched keys' values (memory keys included)
    paper_row: str | None = None
    paper_value: float | None = None
    error: str = ""
    run_id: str | None = None

    @property
    def memory_size(self) -> str:
        """The paper's "memory" column: tokens (rmt, memtr), cache length (xl), cache + tokens (rmt_xl)."""
        if self.kind not in MEMORY_KINDS:  # a run logged without the key
            return "?"
        return MEMORY_KINDS[self.kind].memory_size(self.num_tokens, self.xl_len)

    @property
    def label(self) -> str:
        """``(memory size, unroll)``, the point label of the plots."""
        return f"({self.memory_size}, {self.bptt_unroll})"

    @property
    def diff(self) -> float | None:
        if self.best is None or self.paper_value is None:
            return None
        return self.best - self.paper_value


def summarise(rows: Iterable[Mapping[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """Best metric, peak memory, state size, throughput and the curve from a trial's evaluation reports
    (dicts holding ``step`` and the metric names; rows without the metric are ignored)."""
    by_step = {int(r[M.STEP]): r for r in rows if _num(r.get(metric)) is not None and _num(r.get(M.STEP)) is not None}
    reports = [by_step[step] for step in sorted(by_step)]  # a step reported twice (a resume) counts once: the last
    if not reports:
        return {"best": None, "peak_mem_bytes": None, "memory_state_bytes": None, "tokens_per_s": None, "curve": []}
    values = [float(r[metric]) for r in reports]
    throughput = [float(r[M.TOKENS_PER_S]) for r in reports if _num(r.get(M.TOKENS_PER_S)) is not None]
    if len(throughput) > 1:
        throughput = throughput[1:]
    peaks = [float(r[M.PEAK_MEM_BYTES]) for r in reports if _num(r.get(M.PEAK_MEM_BYTES)) is not None]
    states = [float(r[M.MEMORY_STATE_BYTES]) for r in reports if _num(r.get(M.MEMORY_STATE_BYTES)) is not None]
    return {"best": min(values) if mode == "min" else max(values),
            "peak_mem_bytes": max(peaks) if peaks else None,
            "memory_state_bytes": states[-1] if states else None,
            "tokens_per_s": sum(throughput) / len(throughput) if throughput else None,
            "curve": [(int(r[M.STEP]), float(r[metric])) for r in reports]}


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


# ---------------------------------------------------------------------------------------------- Pareto

def pareto_front(points: Sequence[tuple[float, float]], mode: str) -> list[int]:
    """Indices of the points no other point beats: less or equal memory (x) and a metric (y) at least as
    good (lower for ``mode="min"``, higher for ``"max"``), strictly better in one. Sorted by x."""
    sign = 1.0 if mode == "min" else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front: list[int] = []
    best = math.inf
    for i in order:
        y = sign * points[i][1]
        if y < best:
            front.append(i)
            best = y
    return front


def frontier(records: Sequence[TrialRecord], x_attr: str, mode: str) -> list[TrialRecord]:
    """The Pareto-optimal trials (by ``x_attr`` and the validation metric) among those with both figures."""
    usable = [r for r in records if r.best is not None and getattr(r, x_attr) is not None]
    return [usable[i] for i in pareto_front([(getattr(r, x_attr), r.best) for r in usable], mode)]


# ----------------------------------------------------------------------------------------------- table

def sort_records(records: Iterable[TrialRecord], mode: str) -> list[TrialRecord]:
    """Best validation metric first; trials without one (failed, unfinished) last."""
    sign = 1.0 if mode == "min" else -1.0
    return sorted(records, key=lambda r: (r.best is None, sign * r.best if r.best is not None else 0.0, r.trial_id))


def _swept_columns(records: Sequence[TrialRecord]) -> list[str]:
    shown = {"memory.kind", "memory.num_tokens", "memory.xl_len", "memory.bptt_unroll"}
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.swept if k not in shown and k not in keys]
    return keys


def table_rows(records: Sequence[TrialRecord], mode: str) -> tuple[list[str], list[list[Any]]]:
    """Header and raw rows (numbers unformatted), sorted by the validation metric."""
    records = sort_records(records, mode)
    metric = records[0].metric if records else M.VAL_PPL
    extra = _swept_columns(records)
    with_paper = any(r.paper_value is not None or r.paper_row for r in records)
    header = ["trial", "kind", "memory", "unroll", *extra, "status", f"best_{metric}"]
    if with_paper:
        header += ["paper_row", f"paper_{metric}", "diff"]
    header += [M.PEAK_MEM_BYTES, M.MEMORY_STATE_BYTES, M.TOKENS_PER_S, "error"]
    rows = []
    for r in records:
        row: list[Any] = [r.trial_id, r.kind, r.memory_size, r.bptt_unroll, *(r.swept.get(k, "") for k in extra),
                          r.status, r.best]
        if with_paper:
            row += [r.paper_row or "", r.paper_value, r.diff]
        row += [r.peak_mem_bytes, r.memory_state_bytes, r.tokens_per_s, r.error]
        rows.append(row)
    return header, rows


def to_csv(records: Sequence[TrialRecord], mode: str) -> str:
    header, rows = table_rows(records, mode)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return out.getvalue()


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key in (M.PEAK_MEM_BYTES,):
        return f"{value / 2**20:,.1f} MiB"
    if key == M.MEMORY_STATE_BYTES:
        return f"{value / 1024:,.1f} KiB" if value >= 1024 else f"{value:,.0f} B"
    if key == M.TOKENS_PER_S:
        return f"{value:,.0f}"
    if key == "diff":
        return f"{value:+.4g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _formatted(records: Sequence[TrialRecord], mode: str) -> tuple[list[str], list[list[str]]]:
    header, rows = table_rows(records, mode)
    keep = [i for i, h in enumerate(header) if h != "error" or any(row[i] for row in rows)]
    header = [header[i] for i in keep]
    return header, [[_fmt(header[j], row[i]) for j, i in enumerate(keep)] for row in rows]


def to_markdown(records: Sequence[TrialRecord], mode: str) -> str:
    header, rows = _formatted(records, mode)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_text(records: Sequence[TrialRecord], mode: str) -> str:
    """An aligned plain-text table for the terminal."""
    header, rows = _formatted(records, mode)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots

_AXES = ((M.PEAK_MEM_BYTES, "peak memory (MiB)", 2**20), (M.MEMORY_STATE_BYTES, "memory-state size (KiB)", 1024))


def plot_tradeoff(records: Sequence[TrialRecord], mode: str, path: Path | str, title: str = "") -> Path:
    """Validation metric against peak memory and against memory-state size, one point per trial labelled
    ``(memory size, unroll)``, the Pareto frontier drawn; published figures (paper grids) as hollow
    markers at the same x, joined to the trial's point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in records if r.best is not None]
    metric = records[0].metric if records else M.VAL_PPL
    kinds = sorted({r.kind for r in usable})
    colors = dict(zip(MEMORY_KINDS, ("tab:gray", "tab:olive", "tab:blue", "tab:orange", "tab:green", "tab:purple")))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, (attr, xlabel, scale) in zip(axes, _AXES):
        for kind in kinds:
            pts = [r for r in usable if r.kind == kind and getattr(r, attr) is not None]
            ax.scatter([getattr(r, attr) / scale for r in pts], [r.best for r in pts], s=36, zorder=3,
                       color=colors.get(kind, "tab:purple"), label=kind)
        for r in usable:
            x = getattr(r, attr)
            if x is None:
                continue
            prefix = f"{r.kind} " if len(kinds) > 1 else ""
            ax.annotate(prefix + r.label, (x / scale, r.best), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if r.paper_value is not None:
                ax.scatter([x / scale], [r.paper_value], s=36, facecolors="none", edgecolors="black", zorder=3,
                           label="published" if "published" not in ax.get_legend_handles_labels()[1] else None)
                ax.plot([x / scale] * 2, [r.best, r.paper_value], color="black", lw=0.6, ls=":")
                ax.annotate(f"{r.diff:+.3g}", (x / scale, r.paper_value), textcoords="offset points", xytext=(4, -9),
                            fontsize=6, color="dimgray")
        front = frontier(usable, attr, mode)
        if front:
            xs = [getattr(r, attr) / scale for r in front]
            ys = [r.best for r in front]
            ax.step(xs, ys, where="post", color="tab:red", lw=1.2, ls="--", zorder=2, label="Pareto frontier")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"best {metric} ({'lower' if mode == 'min' else 'higher'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"{metric} against memory", fontsize=11)
    return _save_figure(fig, path)


def _save_figure(fig: Any, path: Path | str) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(records: Sequence[TrialRecord], path: Path | str, title: str = "") -> Path:
    """The validation curve of every trial over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = records[0].metric if records else M.VAL_PPL
    fig, ax = plt.subplots(figsize=(8, 5))
    kinds = {r.kind for r in records}
    for r in records:
        if not r.curve:
            continue
        steps, values = zip(*r.curve)
        name = f"{r.kind} {r.label}" if len(kinds) > 1 else r.label
        style = {"done": "-", "stopped": "--", "failed": ":", "running": "-."}.get(r.status, "-")
        ax.plot(steps, values, style, marker="o", ms=3, label=f"{name} [{r.trial_id}]" + (
            f" {r.status}" if r.status != "done" else ""))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if any(r.curve for r in records):
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or f"{metric} over training", fontsize=11)
    return _save_figure(fig, path)


def write_report(records: Sequence[TrialRecord], mode: str, directory: Path | str, title: str = "") -> list[Path]:
    """results.csv, results.md, tradeoff.png and curves.png in ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.csv").write_text(to_csv(records, mode))
    (directory / "results.md").write_text((f"# {title}\n\n" if title else "") + to_markdown(records, mode))
    return [directory / "results.csv", directory / "results.md",
            plot_tradeoff(records, mode, directory / "tradeoff.png", title),
            plot_curves(records, directory / "curves.png", title)]


# --------------------------------------------------------------------------------------------- MLflow

def _trial_status(run: Any) -> str:
    status, tags = run.info.status, run.data.tags
    if status == "FAILED":
        return "failed"
    if status == "FINISHED":
        return "stopped" if tags.get(STOPPED_TAG) == "true" else "done"
    return "running"


def record_from_run(client: Any, run: Any, metric: str, mode: str, swept_keys: Sequence[str]) -> TrialRecord:
    """A trial's record from its MLflow run: params for the configuration, metric histories for figures."""
    params, tags = run.data.params, run.data.tags

    def param(key: str) -> Any:
        return _coerce(key, params[key]) if key in params and key in KEY_TYPES else params.get(key)

    by_step: dict[int, dict[str, Any]] = {}
    for name in (metric, M.PEAK_MEM_BYTES, M.MEMORY_STATE_BYTES, M.TOKENS_PER_S):
        for m in client.get_metric_history(run.info.run_id, name):  # a resumed run may log a step twice
            row = by_step.setdefault(m.step, {M.STEP: m.step})
            row[name] = m.value
    figures = summarise(by_step.values(), metric, mode)
    paper_value = tags.get(PAPER_VALUE_TAG)
    return TrialRecord(
        trial_id=tags.get(TRIAL_TAG, run.info.run_name or run.info.run_id), kind=param("memory.kind") or "?",
        num_tokens=param("memory.num_tokens") or 0, xl_len=param("memory.xl_len") or 0,
        bptt_unroll=param("memory.bptt_unroll") or 0, status=_trial_status(run), metric=metric,
        swept={k: param(k) for k in swept_keys if k in params}, paper_row=tags.get(PAPER_ROW_TAG) or None,
        paper_value=float(paper_value) if paper_value not in (None, "") else None,
        error=tags.get(ERROR_TAG, ""), run_id=run.info.run_id, **figures)


def find_parent(client: Any, experiment: str, sweep: str | None = None) -> Any:
    """The parent run of sweep ``sweep`` (default: the latest sweep) in ``experiment``; LookupError if none."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"--experiment: no MLflow experiment named {experiment!r}")
    query = f"tags.`{ROLE_TAG}` = 'parent'" + (f" and tags.`{SWEEP_TAG}` = '{sweep}'" if sweep else "")
    runs = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise LookupError(f"--sweep: no sweep named {sweep!r} in experiment {experiment!r}" if sweep else
                          f"--experiment: experiment {experiment!r} holds no sweep (no parent run tagged {ROLE_TAG})")
    return runs[0]


def records_from_mlflow(client: Any, parent: Any) -> tuple[list[TrialRecord], str, str]:
    """Every trial (child run) of a sweep's parent run, with the sweep's metric and mode."""
    metric = parent.data.tags.get(METRIC_TAG, M.VAL_PPL)
    mode = parent.data.tags.get(MODE_TAG, "min")
    swept = [k[len(SEARCH_PARAM_PREFIX):] for k in parent.data.params if k.startswith(SEARCH_PARAM_PREFIX)]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=10_000)
    return [record_from_run(client, run, metric, mode, swept) for run in children], metric, mode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rmt_dist.report",
                                     description="Print a sweep's results table from MLflow, best first.")
    parser.add_argument("--experiment", required=True, help="MLflow experiment holding the sweep")
    parser.add_argument("--sweep", default=None, help="the sweep's name (default: the latest sweep)")
    parser.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.add_argument("--csv", default=None, help="also write the table as CSV to this file")
    parser.add_argument("--markdown", action="store_true", help="print Markdown instead of aligned text")
    args = parser.parse_args(argv)

    import mlflow

    cfg = Config()
    cfg.mlflow.tracking_uri = args.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))
    try:
        parent = find_parent(client, args.experiment, args.sweep)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records, metric, mode = records_from_mlflow(client, parent)
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    print(f"sweep {parent.data.tags.get(SWEEP_TAG, parent.info.run_name)} (parent run {parent.info.run_id}): "
          f"{len(records)} trials, " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + f"; sorted by best {metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    print(to_markdown(records, mode) if args.markdown else to_text(records, mode), end="")
    if args.csv:
        Path(args.csv).write_text(to_csv(records, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
