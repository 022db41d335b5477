"""rlt.report: plots, the run / sweep report and the run summary, on hand-built run dirs (no training)."""

from __future__ import annotations

import csv
import doctest
import json
import logging
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlt import report as R
from rlt import report_summary as S

STEPS = list(range(1, 11))
GROUP_FILES = {"loss", "reward", "kl", "entropy", "completions", "learning_rate", "grad_norm", "timing", "eval"}


def _records(lr: float = 1e-3, shift: float = 0.0) -> list[dict]:
    """10 training records (loss falls, reward rises), evaluations at steps 5 and 10, the trainer's final record."""
    records = []
    for s in STEPS:
        records.append({
            "step": s, "epoch": s / 100, "time": 1000.0 + 2 * s, "loss": 2.0 - 0.1 * s + shift,
            "reward": 0.1 * s + shift, "reward_std": 0.5, "rewards/correctness/mean": 0.05 * s,
            "teacher_kl/log_prob_term": -5.0 + 0.1 * s, "teacher_kl/kl_term": 0.5 - 0.01 * s,
            "teacher_kl/match_reward": -0.2, "kl": 0.001 * s, "entropy": 1.0 - 0.01 * s,
            "completions/mean_length": 30.0 + s, "completions/clipped_ratio": 0.5 / s, "learning_rate": lr,
            "grad_norm": 1.0 / s, "timing/generation": 0.3, "step_time": 0.7, "num_tokens": 100.0 * s,
            "frac_reward_zero_std": "nan",
        })
        if s % 5 == 0:
            records.append({"step": s, "time": 1000.5 + 2 * s, "eval_loss": 1.5 - 0.1 * s / 5 + shift,
                            "eval_reward": {5: 0.4, 10: 0.3}[s] + shift, "eval_runtime": 3.0})
    records.append({"step": 10, "time": 1021.0, "train_runtime": 21.0, "train_loss": 1.45})
    return records


def _write_run(path: Path, records: list[dict], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config if config is not None else _config(path)))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(path: Path, lr: float = 1e-3) -> dict:
    return {"run_name": "tiny", "output_dir": str(path), "learning_rate": lr, "train_batch_size": 16,
            "num_generations": 4, "beta": 0.04, "temperature": 1.0, "max_steps": 10, "model_name_or_path": "rlt:tiny",
            "report_to": ["none"], "synthetic": {"num_train": 400, "ops": "+-"}}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return _write_run(tmp_path / "run", _records())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, R.Report]:
    """A 2-job sweep (learning_rate 1e-3 / 3e-3) the way Hydra lays it out, and its report."""
    root = tmp_path_factory.mktemp("sweep") / "tiny" / "multirun"
    for lr, shift in ((1e-3, 0.0), (3e-3, -0.5)):
        job = root / f"learning_rate={lr},max_steps=10"
        config = _config(job, lr)
        _write_run(job, _records(lr, shift), config)
    samples = [{"step": 10, "prompt": "What is 2+3?", "completion": 'x\x13 <script src="http://evil.example/a.js"></script>',
                "reward": 0.25, "teacher_kl/kl_term": 0.1}]
    (root / "learning_rate=0.001,max_steps=10" / "samples.jsonl").write_text(json.dumps(samples[0]) + "\n")
    return root, R.build_report([root], last=5)


def _is_real_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 5_000, path
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 10, f"{path} is (almost) a single colour"


# ---------------------------------------------------------------- pure helpers


def test_docstring_examples():
    result = doctest.testmod(R)
    assert result.attempted >= 6 and result.failed == 0


def test_summarize_best_by_key_direction_and_last_n():
    records = _records()
    assert R.summarize(records, "loss", last=5) == pytest.approx(
        {"first": 1.9, "last": 1.0, "best": 1.0, "mean_last": 1.2})
    assert R.summarize(records, "reward", last=3) == pytest.approx(
        {"first": 0.1, "last": 1.0, "best": 1.0, "mean_last": 0.9})
    assert R.summarize(records, "eval_reward")["best"] == pytest.approx(0.4)  # max, not the last
    assert R.summarize(records, "eval_loss")["best"] == pytest.approx(1.3)  # min
    assert R.summarize(records, "teacher_kl/kl_term")["best"] == pytest.approx(0.4)  # a penalty: min
    assert R.summarize(records, "teacher_kl/log_prob_term")["best"] == pytest.approx(-4.0)  # max
    assert R.summarize(records, "loss", last=100)["mean_last"] == pytest.approx(1.45)
    assert R.summarize(records, "frac_reward_zero_std") is None  # "nan" strings are not values
    assert R.summarize(records, "absent") is None


def test_differing_keys():
    a = {"learning_rate": 1e-3, "output_dir": "/a", "synthetic": {"num_train": 400}, "report_to": ["none"]}
    b = {"learning_rate": 3e-3, "output_dir": "/b", "synthetic": {"num_train": 800}, "report_to": ["none"]}
    c = {**a, "beta": 0.1}
    assert R.differing_keys([a, b]) == ["learning_rate", "synthetic.num_train"]
    assert R.differing_keys([a, c]) == ["beta"]  # missing from one counts
    assert R.differing_keys([a, dict(a)]) == [] and R.differing_keys([a]) == []
    assert R.differing_keys([a, {**a, "report_to": ["wandb"]}]) == ["report_to"]


def test_find_runs(tmp_path):
    single = _write_run(tmp_path / "single", _records())
    jobs = [_write_run(tmp_path / "sweep" / "multirun" / f"lr={v}", _records()) for v in ("b", "a")]
    (tmp_path / "sweep" / "multirun" / "lr=a" / "checkpoint-5").mkdir()
    assert R.find_runs([single]) == [single]
    assert R.find_runs([tmp_path / "sweep"]) == sorted(jobs)
    assert R.find_runs([single / "metrics.jsonl", tmp_path]) == [single, *sorted(jobs)]  # no duplicates
    assert R.find_runs([tmp_path / "sweep" / "multirun" / "lr=a" / "checkpoint-5"]) == []
    with pytest.raises(FileNotFoundError, match="nowhere"):
        R.find_runs([tmp_path / "nowhere"])


# ---------------------------------------------------------------- plots


def test_write_plots_writes_one_real_png_per_group(run_dir):
    paths = R.write_plots(run_dir)
    assert {p.stem for p in paths} == GROUP_FILES
    assert all(p.parent == run_dir / "plots" for p in paths)
    for path in paths:
        _is_real_png(path)


def test_groups_without_data_are_skipped(tmp_path):
    run = _write_run(tmp_path / "sft", [{"step": s, "time": s, "loss": 1.0 / s, "learning_rate": 1e-3}
                                         for s in STEPS])
    assert sorted(p.name for p in R.write_plots(run)) == ["learning_rate.png", "loss.png"]


def test_plotted_values_are_the_logged_values(run_dir):
    records = _records()  # what run_dir/metrics.jsonl holds
    figures = R.plot_groups([("run", R.load_run(run_dir).records)])
    assert set(figures) == GROUP_FILES
    panels = {ax.get_title(): ax for fig in figures.values() for ax in fig.axes if ax.get_visible()}
    assert {"reward", "rewards/correctness/mean", "teacher_kl/log_prob_term", "teacher_kl/kl_term",
            "teacher_kl/match_reward", "eval_loss", "eval_reward", "timing/generation", "step_time",
            "completions/clipped_ratio"} <= set(panels)
    assert "eval_runtime" not in panels and "frac_reward_zero_std" not in panels
    for key, ax in panels.items():
        (line,) = ax.get_lines()
        expected = [(r["step"], r[key]) for r in records if isinstance(r.get(key), float | int)]
        np.testing.assert_allclose(line.get_xydata(), np.array(expected, dtype=float), err_msg=key)
    (loss,) = panels["loss"].get_lines()
    np.testing.assert_allclose(loss.get_ydata(), [2.0 - 0.1 * s for s in STEPS])


def test_overlaid_plot_has_one_labelled_line_per_run():
    fig = R.plot_group([("lr=1e-3", _records()), ("lr=3e-3", _records(shift=1.0))], ["loss", "reward"], "t")
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["lr=1e-3", "lr=3e-3"]
    np.testing.assert_allclose(fig.axes[0].get_lines()[1].get_ydata(), [3.0 - 0.1 * s for s in STEPS])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lr=1e-3", "lr=3e-3"]


def test_write_plots_never_raises(tmp_path, monkeypatch, caplog):
    def broken(_runs):
        raise RuntimeError("no canvas")

    monkeypatch.setattr(R, "plot_groups", broken)
    with caplog.at_level(logging.WARNING, logger="rlt.report"):
        assert R.write_plots(_write_run(tmp_path / "r", _records())) == []
    assert "no canvas" in caplog.text
    monkeypatch.undo()
    assert R.write_plots(tmp_path / "missing") == []  # no metrics: nothing to draw


# ---------------------------------------------------------------- the sweep report


def test_sweep_comparison_table(sweep, capsys):
    root, report = sweep
    assert len(report.runs) == 2 and report.out == root / "report"
    assert report.keys == ["learning_rate"]  # output_dir differs too, but is not a difference
    assert [r.label for r in report.runs] == ["learning_rate=0.001", "learning_rate=0.003"]
    header, rows = report.header, report.rows
    col = {name: i for i, name in enumerate(header)}
    assert header[0] == "learning_rate" and header[-1] == "run"
    assert [row[col["learning_rate"]] for row in rows] == [1e-3, 3e-3]
    assert [row[col["steps"]] for row in rows] == [10, 10]
    expected = {"loss final": [1.0, 0.5], "loss best": [1.0, 0.5], "loss mean5": [1.2, 0.7],
                "reward final": [1.0, 0.5], "reward best": [1.0, 0.5], "reward mean5": [0.8, 0.3],
                "teacher_kl/kl_term best": [0.4, 0.4], "eval_loss final": [1.3, 0.8], "eval_loss best": [1.3, 0.8],
                "eval_reward final": [0.3, -0.2], "eval_reward best": [0.4, -0.1]}
    for name, values in expected.items():
        assert [row[col[name]] for row in rows] == pytest.approx(values), name
    assert "eval_runtime final" not in col and "entropy final" not in col

    with open(report.out / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["loss mean5"]) for r in table] == pytest.approx([1.2, 0.7])
    assert [float(r["learning_rate"]) for r in table] == [1e-3, 3e-3]
    md = (report.out / "comparison.md").read_text()
    assert md.startswith("| learning_rate | steps | loss final |") and "| 0.001 | 10 | 1 |" in md

    assert "learning_rate=0.001" in report.table_text
    assert re.search(r"^loss mean5\s+1\.2\s+0\.7$", report.table_text, re.M)
    with pytest.MonkeyPatch.context() as mp:  # the command line prints the same table (plots tested above)
        mp.setattr(R, "plot_groups", lambda runs: {})
        assert R.main([str(root), "--out", str(root / "again")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^reward best\s+1\s+0\.5$", printed, re.M) and "report.html" in printed


def test_sweep_plots_per_run_and_overlaid(sweep):
    root, report = sweep
    assert {p.stem for p in report.overlay_plots} == GROUP_FILES
    assert all(p.parent == root / "report" / "plots" for p in report.overlay_plots)
    for run in report.runs:
        assert {p.stem for p in report.run_plots[run.path]} == GROUP_FILES
    for path in [report.overlay_plots[0], report.run_plots[report.runs[1].path][0]]:
        _is_real_png(path)


def test_report_html_is_self_contained(sweep):
    _, report = sweep
    page = report.html.read_text()
    assert "<table>" in page and "<th>learning_rate=0.003</th>" in page
    assert re.search(r'<th class="text">loss mean5</th><td>1.2</td><td>0.7</td>', page)
    assert page.count("data:image/png;base64,") == 3 * len(GROUP_FILES)  # overlaid + each run's
    assert "&lt;script src=&quot;http://evil.example/a.js&quot;&gt;" in page  # the sample, escaped
    assert "x\\x13 " in page and "\x13" not in page  # a control character, shown
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text)
    assert text.count("http") == 1  # only inside the escaped sample


def test_command_line_errors(tmp_path, capsys):
    assert R.main([str(tmp_path / "nowhere")]) == 2
    assert R.main([str(tmp_path)]) == 2  # no run under it
    assert R.main([str(tmp_path), "--last", "0"]) == 2
    assert capsys.readouterr().err.count("error: ") == 3


# ---------------------------------------------------------------- summary.json


def _tracking(monkeypatch, swept_values=None) -> None:
    """A stand-in rlt.tracking (the real one imports transformers), with or without `swept_values`."""
    module = types.ModuleType("rlt.tracking")
    if swept_values is not None:
        module.swept_values = swept_values
    monkeypatch.setitem(sys.modules, "rlt.tracking", module)


def test_run_summary(run_dir, monkeypatch):
    _tracking(monkeypatch)
    summary = S.run_summary(run_dir)
    assert summary["swept"] == {}
    assert summary["hyperparameters"] == {"learning_rate": 1e-3, "train_batch_size": 16, "num_generations": 4,
                                          "beta": 0.04, "temperature": 1.0, "max_steps": 10,
                                          "model_name_or_path": "rlt:tiny"}
    assert set(summary["metrics"]) == {"loss", "reward", "rewards/correctness/mean", "teacher_kl/log_prob_term",
                                       "teacher_kl/kl_term", "teacher_kl/match_reward"}
    assert summary["metrics"]["reward"] == pytest.approx({"first": 0.1, "last": 1.0, "best": 1.0, "mean_last": 0.8})
    assert summary["eval"] == pytest.approx({"eval_loss": 1.3, "eval_reward": 0.3})
    assert summary["wall_time_s"] == pytest.approx(19.0)
    assert (summary["steps"], summary["num_tokens"], summary["best_checkpoint_step"]) == (10, 1000, None)
    json.dumps(summary)

    _tracking(monkeypatch, lambda: {"learning_rate": 1e-3})
    assert S.run_summary(run_dir)["swept"] == {"learning_rate": 1e-3}
    _tracking(monkeypatch, lambda: 1 / 0)
    assert S.run_summary(run_dir)["swept"] == {}


def test_best_checkpoint_step(run_dir):
    for step in (5, 10):
        (run_dir / f"checkpoint-{step}").mkdir()
        (run_dir / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"best_model_checkpoint": None}))
    assert S.best_checkpoint_step(run_dir) == 5  # eval_reward 0.4 at step 5 beats 0.3 at step 10
    shutil.rmtree(run_dir / "checkpoint-5")
    assert S.best_checkpoint_step(run_dir) == 10  # only among the checkpoints still saved
    state = {"best_model_checkpoint": "/elsewhere/run/checkpoint-7", "best_global_step": None}
    (run_dir / "checkpoint-10" / "trainer_state.json").write_text(json.dumps(state))
    assert S.best_checkpoint_step(run_dir) == 7  # early stopping: the trainer's own pick
    state["best_global_step"] = 8
    (run_dir / "checkpoint-10" / "trainer_state.json").write_text(json.dumps(state))
    assert S.best_checkpoint_step(run_dir) == 8


# ---------------------------------------------------------------- in a real browser


BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(sweep, tmp_path):
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip("no headless browser on PATH (install chromium)")
    _, report = sweep
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1280,2400", "--enable-logging=stderr", "--v=0", report.html.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), done.stderr[-2000:]
    _is_real_png(shot)
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line
               or "Failed to load resource" in line]
    assert not console, "\n".join(console)
