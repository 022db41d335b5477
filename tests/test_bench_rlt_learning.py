"""bench/rlt_learning.py: its pure helpers and the warm-up cache (fast), and the `--quick` pipeline end to end
(slow): warm-up (cached), RLT, distillation by both teachers, a student on each set, held-out evaluation, table and
JSON."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.rlt_learning import (  # noqa: E402
    binomial_se,
    cache_key,
    p_text,
    paired_bootstrap,
    solution_block,
    student_summary,
    warm_up,
)


def test_paired_bootstrap_of_a_clear_gain_and_of_no_difference():
    gain = paired_bootstrap([0.0] * 50 + [1.0] * 50, [1.0] * 90 + [0.0] * 10, seed=1)
    assert gain["diff"] == pytest.approx(0.4) and gain["n"] == 100
    assert 0.2 < gain["low"] < gain["diff"] < gain["high"] < 0.6 and gain["p"] < 0.01
    same = paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same["diff"] == same["low"] == same["high"] == 0.0 and same["p"] == 1.0
    assert paired_bootstrap([0.0, 1.0], [1.0, 0.0], seed=3) == paired_bootstrap([0.0, 1.0], [1.0, 0.0], seed=3)
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_solution_block_takes_the_last_closed_block():
    o, c = "<|begin_of_solution|>", "<|end_of_solution|>"
    assert solution_block(f"<|begin_of_thought|>\n\n3 + 4 = 7\n\n<|end_of_thought|>\n\n{o}\n\n7\n\n{c}", o, c) == "7"
    assert solution_block(f"{o} 1 {c} {o} 2 {c}", o, c) == "2"
    assert solution_block(f"thought 3 + 4 = 7 {o} 7", o, c) is None  # cut before the close tag: no answer
    assert solution_block("no tags, last number 7", o, c) is None


def test_cache_key_and_standard_error():
    assert cache_key(["a=1", "b=2"]) == cache_key(["a=1", "b=2"]) != cache_key(["a=1", "b=3"])
    assert len(cache_key([])) == 12
    assert binomial_se(0.5, 100) == pytest.approx(0.05) and binomial_se(1.0, 10) == 0.0
    assert p_text(0.0, 2000) == "p<0.0005" and p_text(0.25, 2000) == "p=0.250"


def test_student_summary_averages_seeds_per_question():
    evals = [{"ok": [1.0, 0.0, 1.0, 0.0]}, {"ok": [1.0, 1.0, 0.0, 0.0]}]
    s = student_summary(evals, "ok")
    assert s["per_question"] == [1.0, 0.5, 0.5, 0.0] and s["per_seed"] == [0.5, 0.5]
    assert s["accuracy"] == 0.5 and s["se"] == pytest.approx(binomial_se(0.5, 8))


def rows_of(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "runs" / "distill" / f"{name}.jsonl").read_text().splitlines()]


def _run(tmp_path: Path) -> tuple[str, dict]:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "rlt_learning.py"), "--quick", "--json", str(out),
                           "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")],
                          cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"rlt_learning.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_rlt_learning_quick(tmp_path):
    stdout, result = _run(tmp_path)
    assert "RLT learning benchmark" in stdout and "RL - warm-up (solution)" in stdout
    assert not result["warmup_cached"]
    assert {"warmup", "rlt", "distill", "held_out_reward", "student_warmup_s0", "eval_warmup_s0", "student_rl_s0",
            "eval_rl_s0", "student_reference_s0", "eval_reference_s0"} == set(result["phases"])
    for name in ("warmup", "rl", "reference"):
        assert result["distilled"][name]["rows"] == 16
        student = result["students"][name]
        assert 0.0 <= student["solution"]["accuracy"] <= 1.0 and len(student["solution"]["per_question"]) == 16
        # the student is asked with the system turn of the data it was trained on (rlt.distill's student prompt)
        first = json.loads((tmp_path / "runs" / "distill" / f"{name}.jsonl").read_text().splitlines()[0])
        assert student["system_prompt"] == first["messages"][0]["content"]
    assert result["difference"]["solution"]["n"] == 16
    assert result["held_out_reward"]["paired"]["n"] >= 1
    for name in ("warmup", "rl"):  # both teachers explained (a subset of) the same first 16 training rows
        rows = rows_of(tmp_path, name)
        assert rows and {r["source_index"] for r in rows} <= set(range(16))
    reference = rows_of(tmp_path, "reference")
    assert [r["question"] for r in reference] == [r["question"] for r in rows_of(tmp_path, "warmup")]
    for r in reference:  # the data's worked answer (its last step computes the solution) as the thought
        assert r["messages"][2]["content"].startswith(f"<|begin_of_thought|>\n\n{r['reasoning_trace']}\n\n")
        assert f"= {r['solution']}" in r["reasoning_trace"]

    cached = tmp_path / "cache" / f"rlt-warmup-{cache_key(result['warmup_overrides'])}"
    assert (cached / "final" / "config.json").is_file()
    assert json.loads((cached / "overrides.json").read_text()) == result["warmup_overrides"]


def test_warm_up_reuses_a_cached_teacher_with_the_same_settings(tmp_path, capsys):
    """A warm-up whose final/ exists under the key of its overrides is reused: no training, no phase timed."""
    overrides = ["run_cfg=teacher_sft_tiny", "max_steps=3"]
    final = tmp_path / f"rlt-warmup-{cache_key(overrides)}" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    args = argparse.Namespace(cache_dir=str(tmp_path), no_cache=False)
    phases: dict = {}
    assert warm_up(args, overrides, phases) == (str(final.resolve()), True)
    assert phases == {} and "from the cache" in capsys.readouterr().out
