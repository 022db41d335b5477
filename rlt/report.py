"""Plots, a run / sweep report and the run summary, from run dirs' metrics.jsonl and config.yaml.

    python -m rlt.report results/tiny_grpo                      # plots in results/tiny_grpo/plots/ + report.html
    python -m rlt.report results/tiny_sft/multirun --last 10    # a sweep: every job's plots, overlaid plots,
                                                                # comparison table, report.html in multirun/report/
    python -m rlt.report results/run_a results/run_b --out cmp  # any runs side by side

A PATH is a run dir or any dir above run dirs (every dir holding a metrics.jsonl below it is a run). Each run gets
one PNG per metric group in `<run>/plots/` (loss, reward and its terms, KL, entropy, completion lengths, learning
rate, gradient norm, timing, evaluation; a group without data is skipped). Several runs also get the same plots with
one line per run, labelled by the config keys that differ between them, and a comparison table (those keys, then
final / best / mean of the last N logged values of each main metric, and the evaluation results), printed and
written as comparison.csv and comparison.md. report.html holds it all in one file that opens offline.

`write_plots(run_dir)` (called at the end of a training run when `plots` is true) is the piece the recipes use, with
`rlt.report_summary.run_summary` (summary.json); the page itself is `rlt.report_html`. matplotlib is imported only
when a plot is drawn, on the Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
SAMPLES_FILE = "samples.jsonl"
PLOTS_DIR = "plots"
DEFAULT_LAST = 5

# The RLT teacher reward's terms, in the order of its formula: reward = log_prob_term - kl_term + match_reward.
_TEACHER_TERMS = [r"teacher_kl/log_prob_term", r"teacher_kl/kl_term", r"teacher_kl/[^/]+_term",
                  r"teacher_kl/match_reward"]
_TERMS = [r"reward", r"reward_std", r"rewards/.+/mean", *_TEACHER_TERMS,
          r"(?!eval_)[^/]+/accuracy", r"(?!eval_)[^/]+/strict_accuracy"]
_EVAL_BASES = [r"loss", r"perplexity", r"mean_token_accuracy", r".*accuracy.*", r"pass@.+", r"reward",
               r"rewards/.+/mean", *_TEACHER_TERMS, r"kl", r"entropy",
               r"completions/mean_length", r"completions/clipped_ratio"]
# Metric groups: (file name, title, key patterns; a pattern is a full-match regex). One figure per group, one panel
# per key, in pattern order.
GROUPS: list[tuple[str, str, list[str]]] = [
    ("loss", "Training loss", [r"loss", r"mean_token_accuracy"]),
    ("reward", "Reward and its terms", _TERMS),
    ("kl", "KL to the reference model", [r"kl"]),
    ("entropy", "Entropy of the policy", [r"entropy"]),
    ("completions", "Completion lengths and clipped fraction",
     [r"completions/mean_length", r"completions/max_length", r"completions/mean_terminated_length",
      r"completions/clipped_ratio"]),
    ("learning_rate", "Learning rate", [r"learning_rate"]),
    ("grad_norm", "Gradient norm", [r"grad_norm"]),
    ("timing", "Timing", [r"timing/.+", r"step_time"]),
    ("eval", "Evaluation", [rf"eval_{p}" for p in _EVAL_BASES]),
]
# The comparison table's and the summary's metrics: training metrics (final / best / mean of the last N) and
# evaluation results (final / best).
MAIN_METRICS = [r"loss", r"mean_token_accuracy", r"reward", r"rewards/.+/mean", *_TEACHER_TERMS, r"kl"]
TABLE_EVAL_METRICS = [r"eval_loss", r"eval_mean_token_accuracy", r"eval_.*accuracy.*", r"eval_pass@.+",
                      r"eval_reward", r"eval_rewards/.+/mean"]
SUMMARY_TERMS = [r"loss", r"reward", r"rewards/.+/mean", *_TEACHER_TERMS]
HYPERPARAMETERS = ["learning_rate", "train_batch_size", "num_generations", "beta", "temperature", "max_steps",
                   "model_name_or_path"]
# Keys that say where a run is, not what it is: never a difference between runs.
NOT_COMPARED = frozenset({"output_dir", "results_dir", "resume", "resume_from"})
NOT_RESULTS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
MAX_LABEL_KEYS = 4  # more differing keys than this: runs are labelled by their dir name
MAX_TABLE_KEYS = 8


# ---------------------------------------------------------------- pure helpers


def read_records(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (or samples.jsonl); a line that does not parse (a run killed mid-write) is
    skipped; a missing file is no records."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value) -> float | None:
    """A finite float, or None (strings such as "nan" from tracking's _jsonable, bools, missing values)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(records: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` in logged order, records without a finite numeric value skipped."""
    steps, values = [], []
    for record in records:
        value = _number(record.get(key))
        if value is not None:
            steps.append(float(record.get("step", len(steps))))
            values.append(value)
    return steps, values


_LOWER_IS_BETTER = ("loss", "perplexity", "kl", "clipped", "nonfinite", "time", "runtime", "grad_norm")


def higher_is_better(key: str) -> bool:
    """Whether a larger value of `key` is better: rewards, their terms (except penalties such as the KL term),
    accuracies, throughputs; losses, perplexity, KL, clipped fractions and durations (`*_s`) are better small.
    Other keys: larger.

    >>> [higher_is_better(k) for k in ("eval_loss", "reward", "teacher_kl/kl_term", "teacher_kl/match_reward")]
    [False, True, False, True]
    >>> [higher_is_better(k) for k in ("timing/step_s", "timing/tokens_per_s", "eval_mean_token_accuracy")]
    [False, True, True]
    """
    base = key.removeprefix("eval_")
    if base.startswith("reward"):
        return True
    leaf = base.rsplit("/", 1)[-1]
    if leaf.endswith(("per_s", "per_second")):  # throughput
        return True
    return not (leaf.endswith("_s") or any(word in leaf for word in _LOWER_IS_BETTER))


def summarize(records: Iterable[dict], key: str, last: int = DEFAULT_LAST) -> dict[str, float] | None:
    """First, last, best and mean of the last `last` values of `key` in `records` (logged order); None if `key`
    has no finite value. Best is the maximum for rewards and accuracies, the minimum for losses, KL and the like
    (`higher_is_better`, decided by the key's name).

    >>> records = [{"step": 1, "loss": 2.0, "reward": 0.1}, {"step": 2, "loss": 1.0, "reward": 0.5},
    ...            {"step": 2, "eval_loss": 1.4}, {"step": 3, "loss": 1.5, "reward": 0.3}]
    >>> summarize(records, "loss", last=2)      # best = min; mean of the last 2 = (1.0 + 1.5) / 2
    {'first': 2.0, 'last': 1.5, 'best': 1.0, 'mean_last': 1.25}
    >>> summarize(records, "reward", last=5)    # best = max; fewer than 5 values: the mean of all of them
    {'first': 0.1, 'last': 0.3, 'best': 0.5, 'mean_last': 0.3}
    >>> summarize(records, "kl") is None
    True
    """
    _, values = series(records, key)
    if not values:
        return None
    tail = values[-max(1, last):]
    return {"first": values[0], "last": values[-1],
            "best": max(values) if higher_is_better(key) else min(values),
            "mean_last": math.fsum(tail) / len(tail)}


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as one level with dotted keys: {"synthetic": {"num_train": 400}} -> synthetic.num_train.

    >>> flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}})
    {'a': 1, 'b.c': [1, 2], 'b.d.e': None}
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


_MISSING = object()


def differing_keys(configs: Sequence[dict]) -> list[str]:
    """The (dotted) keys whose values are not the same in all `configs`, a key missing from some counting as a
    difference; where a run is (output_dir, results_dir, resume settings) is not a difference. Hyperparameters
    first (`HYPERPARAMETERS` order), then alphabetical.

    >>> differing_keys([{"learning_rate": 1e-3, "output_dir": "a", "synthetic": {"num_train": 4}},
    ...                 {"learning_rate": 3e-3, "output_dir": "b", "synthetic": {"num_train": 4}, "beta": 0.1}])
    ['learning_rate', 'beta']
    """
    flats = [flatten(c or {}) for c in configs]
    if len(flats) < 2:
        return []
    keys = {k for f in flats for k in f} - NOT_COMPARED
    differ = [k for k in keys if len({json.dumps(f.get(k, _MISSING), sort_keys=True, default=repr)
                                      for f in flats}) > 1]
    order = {k: i for i, k in enumerate(HYPERPARAMETERS)}
    return sorted(differ, key=lambda k: (order.get(k, len(order)), k))


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """The run dirs under `paths`: a path holding metrics.jsonl is a run; any other dir is searched recursively for
    dirs holding one (a sweep's jobs). In the order given, each sweep's jobs sorted, without duplicates.
    A path that does not exist raises FileNotFoundError."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run or sweep dir")
        if path.is_file():  # a metrics.jsonl named directly
            path = path.parent
        if (path / METRICS_FILE).is_file():
            found = [path]
        else:
            found = sorted(p.parent for p in path.rglob(METRICS_FILE) if p.is_file())
        for run in found:
            if run.resolve() not in {r.resolve() for r in runs}:
                runs.append(run)
    return runs


def group_keys(keys: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The keys matching any of `patterns` (full match), in pattern order then alphabetically."""
    keys = sorted(set(keys))
    chosen: list[str] = []
    for pattern in patterns:
        rx = re.compile(pattern)
        chosen += [k for k in keys if k not in chosen and rx.fullmatch(k)]
    return chosen


def numeric_keys(records: Iterable[dict]) -> set[str]:
    return {k for r in records for k, v in r.items() if _number(v) is not None}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


# ---------------------------------------------------------------- runs


@dataclass
class Run:
    path: Path
    records: list[dict]
    config: dict
    label: str = ""
    differing: dict[str, Any] = field(default_factory=dict)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    return Run(path=path, records=read_records(path / METRICS_FILE), config=read_config(path))


def read_config(run_dir: str | Path) -> dict:
    """The run's config.yaml as a dict ({} when missing or unreadable)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        import yaml

        config = yaml.safe_load(path.read_text())
    except Exception as e:  # noqa: BLE001 - a report shows what it can
        log.warning("cannot read %s: %s", path, e)
        return {}
    return config if isinstance(config, dict) else {}


def label_runs(runs: list[Run], common: Path | None = None) -> list[str]:
    """Give each run its label: the differing config keys (`key=value, ...`), or its dir (relative to `common`)
    when none or too many differ. Returns the differing keys."""
    keys = differing_keys([r.config for r in runs])
    for run in runs:
        flat = flatten(run.config)
        run.differing = {k: flat.get(k) for k in keys}
        name = _relative(run.path, common)
        if keys and len(keys) <= MAX_LABEL_KEYS:
            run.label = ", ".join(f"{k}={_short(v)}" for k, v in run.differing.items())
        else:
            run.label = name
    if len({r.label for r in runs}) < len(runs):  # same configs: the dirs tell them apart
        for run in runs:
            run.label = _relative(run.path, common)
    return keys


def _relative(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            rel = os.path.relpath(path, base)
            if rel != ".":
                return rel
        except ValueError:
            pass
    return path.name or str(path)


def common_parent(paths: Sequence[Path]) -> Path:
    resolved = [str(p.resolve()) for p in paths]
    return Path(os.path.commonpath(resolved)) if resolved else Path(".")


# ---------------------------------------------------------------- plots


def _figure(n_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.1 * nrows + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def plot_group(runs: Sequence[tuple[str, list[dict]]], keys: Sequence[str], title: str):
    """A figure with one panel per key and one line per (label, records) run (x = step); returns the
    matplotlib Figure (its Line2D data are exactly the logged values)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(keys))
    fig.suptitle(title)
    for ax, key in zip(axes, keys, strict=True):
        xs: set[float] = set()
        for label, records in runs:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, label=label, marker="o" if len(steps) <= 20 else None, markersize=3,
                        linewidth=1.4)
                xs.update(steps)
        if len(xs) == 1:  # one evaluation: a readable integer axis around it
            ax.set_xlim(min(xs) - 1, min(xs) + 1)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    if len(runs) > 1:
        handles, labels = axes[0].get_legend_handles_labels() if axes else ([], [])
        for ax in axes[1:]:  # every run, even one missing from the first panel
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8)
    return fig


def plot_groups(runs: Sequence[tuple[str, list[dict]]]) -> dict[str, Any]:
    """{group name: Figure} for every group with data in any of `runs`."""
    available = set().union(*(numeric_keys(records) for _, records in runs)) if runs else set()
    figures = {}
    for name, title, patterns in GROUPS:
        keys = group_keys(available, patterns)
        if keys:
            figures[name] = plot_group(runs, keys, title)
    return figures


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    os.replace(tmp, path)
    return path


def _write_figures(figures: dict[str, Any], out: Path) -> list[Path]:
    paths = []
    for name, fig in figures.items():
        paths.append(save_figure(fig, out / f"{name}.png"))
        fig.clear()
    return paths


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write `<run_dir>/plots/<group>.png` for each metric group with data; the files written (raises on error)."""
    run = load_run(run_dir)
    return _write_figures(plot_groups([(run.path.name, run.records)]), run.path / PLOTS_DIR)


def write_plots(run_dir: str | Path) -> list[Path]:
    """`plot_run` that never raises: the end of a training run must not fail on a plot (a warning instead)."""
    try:
        return plot_run(run_dir)
    except Exception as e:  # noqa: BLE001 - plotting is a convenience; the run's results are already saved
        log.warning("could not write the plots of %s: %s: %s", run_dir, type(e).__name__, e)
        return []


# ---------------------------------------------------------------- comparison table


def _table_metrics(runs: Sequence[Run], patterns: Sequence[str]) -> list[str]:
    return group_keys(set().union(*(numeric_keys(r.records) for r in runs)) if runs else set(), patterns)


def comparison_rows(runs: Sequence[Run], keys: Sequence[str], last: int = DEFAULT_LAST) -> tuple[list[str], list]:
    """(header, rows) of the comparison table: the differing `keys`, steps, each main metric's final / best /
    mean of the last `last`, each evaluation result's final / best, and the run's dir. Cells are raw values
    (None when a run lacks the metric)."""
    keys = list(keys)[:MAX_TABLE_KEYS]
    main = _table_metrics(runs, MAIN_METRICS)
    evals = _table_metrics(runs, TABLE_EVAL_METRICS)
    header = [*keys, "steps"]
    for m in main:
        header += [f"{m} final", f"{m} best", f"{m} mean{last}"]
    for m in evals:
        header += [f"{m} final", f"{m} best"]
    header.append("run")
    common = common_parent([r.path for r in runs]) if len(runs) > 1 else None
    rows = []
    for run in runs:
        flat = flatten(run.config)
        steps = [s for s in (_number(r.get("step")) for r in run.records) if s is not None]
        row: list[Any] = [flat.get(k) for k in keys] + [int(max(steps)) if steps else None]
        for m in main:
            s = summarize(run.records, m, last)
            row += [s["last"], s["best"], s["mean_last"]] if s else [None] * 3
        for m in evals:
            s = summarize(run.records, m, last)
            row += [s["last"], s["best"]] if s else [None] * 2
        row.append(_relative(run.path, common) if common else str(run.path))
        rows.append(row)
    return header, rows


def _cell(value: Any) -> str:
    return "" if value is None else _short(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], titles: Sequence[str] | None = None) -> str:
    """Aligned plain text, transposed to fit a terminal: one line per column of the table (differing keys, steps,
    metrics, run dir), one column per run titled by `titles` (default: run 1, run 2, ...); 4 significant digits.

    >>> print(format_table(["learning_rate", "loss final"], [[0.001, 1.23456], [0.003, 0.5]], ["a", "b"]))
                       a      b
    -------------  -----  -----
    learning_rate  0.001  0.003
    loss final     1.235    0.5
    """
    titles = list(titles) if titles is not None else [f"run {i + 1}" for i in range(len(rows))]
    lines = [[name] + [_cell(row[i]) for row in rows] for i, name in enumerate(header)]
    widths = [max(len(t) for t in [title] + [line[j + 1] for line in lines]) for j, title in enumerate(titles)]
    first = max([len(h) for h in header] + [0])
    out = ["  ".join([" " * first] + [t.rjust(w) for t, w in zip(titles, widths, strict=True)]).rstrip(),
           "  ".join(["-" * first] + ["-" * w for w in widths])]
    for line in lines:
        out.append("  ".join([line[0].ljust(first)] + [c.rjust(w) for c, w in zip(line[1:], widths, strict=True)]))
    return "\n".join(out)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(_cell(v)) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else (json.dumps(v) if isinstance(v, list | dict) else v) for v in row]
                          for row in rows])
    return path


# ---------------------------------------------------------------- the report


@dataclass
class Report:
    out: Path
    runs: list[Run]
    keys: list[str]
    header: list[str]
    rows: list[list[Any]]
    run_plots: dict[Path, list[Path]]
    overlay_plots: list[Path]
    html: Path
    table_text: str


def build_report(paths: Sequence[str | Path], out: str | Path | None = None, last: int = DEFAULT_LAST,
                 samples: int = 4) -> Report:
    """Plots of every run under `paths`, the overlaid plots and the comparison table of several, and report.html;
    in `out` (default: the run dir for one run, else the runs' common parent / report)."""
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise FileNotFoundError(f"no run dir (a dir holding {METRICS_FILE}) under {', '.join(map(str, paths))}")
    runs = [load_run(p) for p in run_dirs]
    common = common_parent(run_dirs)
    keys = label_runs(runs, common if len(runs) > 1 else None)
    if out is None:
        out = run_dirs[0] if len(runs) == 1 else common / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    run_plots = {run.path: _write_figures(plot_groups([(run.label, run.records)]), run.path / PLOTS_DIR)
                 for run in runs}
    overlay = []
    if len(runs) > 1:
        is_run = (out / METRICS_FILE).exists()  # --out is one of the runs: keep its own plots
        overlay = _write_figures(plot_groups([(r.label, r.records) for r in runs]),
                                 out / ("plots_all" if is_run else PLOTS_DIR))
    header, rows = comparison_rows(runs, keys, last)
    write_csv(out / "comparison.csv", header, rows)
    (out / "comparison.md").write_text(markdown_table(header, rows))
    title = f"rlt report: {runs[0].path.name}" if len(runs) == 1 else f"rlt report: {len(runs)} runs in {common}"
    from rlt.report_html import render_html

    page = render_html(title, header, rows, overlay, [(r, run_plots[r.path]) for r in runs], last=last,
                       samples=samples)
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return Report(out=out, runs=runs, keys=keys, header=header, rows=rows, run_plots=run_plots,
                  overlay_plots=overlay, html=html_path,
                  table_text=format_table(header, rows, [r.label for r in runs]))


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlt.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="run dirs and/or sweep dirs (searched recursively)")
    p.add_argument("--out", default=None,
                   help="where report.html, comparison.csv/.md and the overlaid plots go (default: the run dir for "
                        "one run, else the runs' common parent / report)")
    p.add_argument("--last", type=int, default=DEFAULT_LAST, help="mean of the last N logged values (default 5)")
    p.add_argument("--samples", type=int, default=4, help=f"rows of each run's {SAMPLES_FILE} shown (default 4)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from rlt.cli import parse_cli

    args = parse_cli(build_parser(), argv, quiet=False)
    if args.last < 1:
        print("error: --last must be >= 1", file=sys.stderr)  # noqa: T201
        return 2
    try:
        report = build_report(args.paths, args.out, args.last, args.samples)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)  # noqa: T201
        return 2
    lines = []
    for run in report.runs:
        plots = report.run_plots[run.path]
        lines.append(f"{run.label}: {len(plots)} plots in {run.path / PLOTS_DIR}" if plots else
                     f"{run.label}: no metrics logged ({run.path})")
    if report.overlay_plots:
        lines.append(f"overlaid: {len(report.overlay_plots)} plots in {report.overlay_plots[0].parent}")
    lines += ["", report.table_text, "", f"table:  {report.out / 'comparison.csv'}, {report.out / 'comparison.md'}",
              f"report: {report.html}"]
    print("\n".join(lines))  # noqa: T201 - the command's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
