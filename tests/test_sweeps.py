"""Sweeps that scale (rlt.sweeps, docs/sweeps.md): jobs as separate processes with Hydra's submitit launcher, a
preempted job requeued and resumed, the SLURM preset's sbatch script, an Optuna search over a declared objective,
and the one-line message for a missing plugin. Needs the `sweeps` extra (hydra-submitit-launcher,
hydra-optuna-sweeper)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlt import sweeps
from rlt.errors import ConfigError, MissingExtraError, RltError
from rlt.train import check_overrides

from .test_tracking import _wandb_runs

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweeps extra is not installed")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweeps extra is not installed")

REPO = Path(__file__).resolve().parents[1]
# tiny SFT jobs: two optimizer steps of one 2-row batch, a 4-row evaluation at the end, nothing else written
FAST = ["run_cfg=tiny_sft", "max_steps=2", "train_batch_size=2", "per_device_train_batch_size=2",
        "per_device_eval_batch_size=4", "max_eval_samples=4", "max_length=64", "synthetic.num_train=16",
        "synthetic.num_eval=4", "plots=false", "save_final_model=false", "report_to=[none]"]

# test only: a submitit job's training steps take at least RLT_TEST_STEP_SLEEP seconds, so that it can be signalled
# while it trains (the job processes import this at start-up through PYTHONPATH)
SLOW_STEPS = """
import os
if os.environ.get("SUBMITIT_LOCAL_JOB_ID") and os.environ.get("RLT_TEST_STEP_SLEEP"):
    import time
    import transformers
    _step = transformers.Trainer.training_step
    def training_step(self, *args, **kwargs):
        time.sleep(float(os.environ["RLT_TEST_STEP_SLEEP"]))
        return _step(self, *args, **kwargs)
    transformers.Trainer.training_step = training_step
"""

# test only: the sbatch script submitit writes is kept, and `sbatch` fails (there is no cluster); submitit's SLURM
# executor wants an `srun` on PATH, which never runs here
FAKE_SLURM = {"sbatch": """#!/bin/sh
cp "$1" "$RLT_TEST_SBATCH_COPY"
echo "sbatch: error: no cluster in this test" >&2
exit 1
""", "srun": "#!/bin/sh\nexit 1\n"}


def _env(**extra) -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", **extra}


def _train(args, *, env=None, timeout=300, script=None):
    entry = ["-c", script] if script else ["-m", "rlt.train"]
    return subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


def _job(job_dir: Path) -> dict:
    return json.loads((job_dir / sweeps.JOB_FILE).read_text())


# ------------------------------------------------------------------------------------------------ pure logic


def test_search_points_cover_every_choice_and_both_ends_of_intervals():
    jobs, keys = sweeps.search_points(["run_cfg=tiny_sft", "learning_rate=tag(log,interval(1e-4,1e-2))",
                                       "seed=1,2,3", "hydra.sweeper.params.max_steps=range(2,4)"])
    assert keys == ["learning_rate", "seed", "max_steps"]
    assert jobs == [
        ["run_cfg=tiny_sft", "learning_rate=0.0001", "seed=1", "max_steps=2"],
        ["run_cfg=tiny_sft", "learning_rate=0.01", "seed=1", "max_steps=2"],
        ["run_cfg=tiny_sft", "learning_rate=0.0001", "seed=2", "max_steps=2"],
        ["run_cfg=tiny_sft", "learning_rate=0.0001", "seed=3", "max_steps=2"],
        ["run_cfg=tiny_sft", "learning_rate=0.0001", "seed=1", "max_steps=3"]]
    with pytest.raises(ConfigError, match="cannot read the search space"):
        sweeps.search_points(["learning_rate=interval(1e-4"])


def test_presets_are_known_to_need_their_plugin(monkeypatch):
    assert sweeps.plugin_of("hydra/launcher", "local")[0] == "hydra-submitit-launcher"
    assert sweeps.plugin_of("hydra/launcher", "slurm_gpu")[0] == "hydra-submitit-launcher"
    assert sweeps.plugin_of("hydra/sweeper", "optuna")[0] == "hydra-optuna-sweeper"
    assert sweeps.plugin_of("hydra/launcher", "basic") is None
    sweeps.check_plugins(["hydra/launcher=slurm_gpu", "hydra/sweeper=optuna"])  # installed: nothing to say
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"hydra/launcher=local needs Hydra's hydra-submitit-launcher plugin.*"
                                                r"pip install -e '\.\[sweeps\]'"):
        sweeps.check_plugins(["run_cfg=tiny_sft", "hydra/launcher=local"])


def test_a_missing_plugin_stops_the_command_in_one_line():
    script = "import sys; sys.modules['optuna'] = None\nfrom rlt.train import main\nmain()"
    proc = _train(["-m", "run_cfg=tiny_sft", "learning_rate=interval(1e-4,1e-2)", "hydra/sweeper=optuna"],
                  script=script, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("rlt: hydra/sweeper=optuna needs Hydra's hydra-optuna-sweeper plugin, which is not "
                                   "installed (optuna cannot be imported): pip install -e '.[sweeps]'")


def test_the_objective_is_read_from_the_run_results(tmp_path):
    rows = [{"step": 1, "loss": 3.0, "grad_norm": 1.5}, {"step": 2, "loss": 2.0, "eval_loss": 2.5},
            {"step": 2, "train_loss": 2.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"global_step": 2, "eval_loss": 2.25, "train_loss": 2.4, "eval": {"eval_mean_token_accuracy": 0.5},
               "metrics": {"loss": {"first": 3.0, "last": 2.0, "best": 2.0, "mean_last": 2.5}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert sweeps.objective_value(tmp_path, "eval_loss") == 2.25  # summary.json's final value wins
    assert sweeps.objective_value(tmp_path, "eval/loss") == 2.25  # wandb's name for it
    assert sweeps.objective_value(tmp_path, "train/loss") == 2.5  # the mean of the last logged values
    assert sweeps.objective_value(tmp_path, "eval/mean_token_accuracy") == 0.5
    assert sweeps.objective_value(tmp_path, "grad_norm") == 1.5  # else the last logged value
    with pytest.raises(RltError) as e:
        sweeps.objective_value(tmp_path, "eval_reward", "grpo")
    assert "eval_reward is the default objective of grpo" in str(e.value)
    assert "its results: eval_loss, eval_mean_token_accuracy, grad_norm, loss, train_loss." in str(e.value)
    assert [sweeps.default_direction(n) for n in ("eval_loss", "eval_reward", "eval/accuracy", "train_loss")] == [
        "minimize", "maximize", "maximize", "minimize"]


def test_a_search_is_checked_at_every_point_before_it_starts():
    jobs = check_overrides(["run_cfg=tiny_sft", "max_steps=2", "learning_rate=interval(1e-4,1e-2)",
                            "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3"], multirun=True)
    assert [job for job, _ in jobs] == [["run_cfg=tiny_sft", "max_steps=2", "learning_rate=0.0001"],
                                        ["run_cfg=tiny_sft", "max_steps=2", "learning_rate=0.01"]]
    runs = [run for _, run in jobs]
    assert sweeps.sweeper_overrides(["hydra/sweeper=optuna"], runs) == ["hydra.sweeper.direction=minimize"]
    with pytest.raises(ConfigError, match="hydra.sweeper.direction=maximize, but the objective eval_loss is to "
                                          "minimize: set sweep_direction=maximize"):
        sweeps.sweeper_overrides(["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize"], runs)
    with pytest.raises(ConfigError, match=r"(?s)1 of 3 sweep jobs have an invalid config.*job #1 .*max_steps=0 "):
        check_overrides(["run_cfg=tiny_sft", "max_steps=choice(2,0)", "learning_rate=interval(1e-4,1e-2)",
                         "hydra/sweeper=optuna"], multirun=True)
    mixed = check_overrides(["run_cfg=tiny_sft,tiny_grpo", "hydra/sweeper=optuna"], multirun=True)
    with pytest.raises(ConfigError, match="its points have several: eval_loss .minimize., eval_reward .maximize."):
        sweeps.sweeper_overrides(["hydra/sweeper=optuna"], [run for _, run in mixed])


# ------------------------------------------------------------------------------------------------ SLURM


def test_the_slurm_preset_writes_an_sbatch_script_with_the_resources(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    copy = tmp_path / "job.sh"
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", RLT_TEST_SBATCH_COPY=str(copy))
    proc = _train(["-m", *FAST, "learning_rate=1e-3,3e-3", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu",
                   "hydra.launcher.account=proj", "hydra.launcher.mem_gb=32", f"results_dir={tmp_path}"],
                  env=env, timeout=120)
    assert proc.returncode != 0 and "no cluster in this test" in proc.stderr, proc.stderr[-3000:]
    script = copy.read_text()
    sweep_dir = tmp_path / "tiny_sft" / "multirun"
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                 "#SBATCH --time=1440", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --signal=USR2@120", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --array=0-1%2", "#SBATCH --job-name=tiny_sft", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={sweep_dir}/slurm/%A_%a/%A_%a_0_log.out"):  # the job's log in the sweep dir
        assert line in script.splitlines(), f"{line!r} not in:\n{script}"
    assert f"-m submitit.core._submit {sweep_dir}/slurm/%j" in script  # each array task runs one pickled job
    assert script.splitlines()[-1].startswith("srun ")


# ------------------------------------------------------------------------------------------------ local processes


def test_local_jobs_are_separate_processes_and_a_preempted_job_resumes_its_run(tmp_path):
    """Two jobs at once with submitit's local executor; the first is sent SIGUSR2 (SLURM's --signal before its time
    limit or on preemption) while it trains: it saves a checkpoint, submitit requeues it, and the new process resumes
    that checkpoint in the same run dir."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_STEPS)
    env = _env(PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               RLT_TEST_STEP_SLEEP="0.4")
    args = ["-m", *FAST, "max_steps=8", "save_steps=2", "learning_rate=1e-3,3e-3", "hydra/launcher=local",
            "report_to=[wandb]", "wandb_mode=offline", f"results_dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "rlt.train", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sweep_dir = tmp_path / "tiny_sft" / "multirun"
    first, second = sweep_dir / "learning_rate=0.001", sweep_dir / "learning_rate=0.003"
    try:
        deadline = time.time() + 240
        while not (first / "checkpoint-2" / ".rlt_complete").exists():
            assert proc.poll() is None and time.time() < deadline, "the first job never saved checkpoint-2"
            time.sleep(0.05)
        os.kill(_job(first)["attempts"][-1]["pid"], signal.SIGUSR2)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]

    jobs = {d.name: _job(d) for d in (first, second)}
    pids = [attempt["pid"] for job in jobs.values() for attempt in job["attempts"]]
    assert len(set(pids)) == 3 and proc.pid not in pids  # each job and each attempt: a process of its own
    assert all(job["status"] == "completed" for job in jobs.values())
    assert [a["status"] for a in jobs[first.name]["attempts"]] == ["requeued", "completed"]
    assert jobs[second.name]["params"] == {"learning_rate": 0.003} and len(jobs[second.name]["attempts"]) == 1
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in (first, second)}
    assert all(s["global_step"] == 8 for s in summaries.values())
    stopped_at = int(Path(summaries[first.name]["resumed_from"]).name.split("-")[1])
    assert 2 <= stopped_at < 8 and summaries[second.name]["resumed_from"] is None
    steps = [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))  # each step once, across the two attempts
    log_id = jobs[first.name]["attempts"][0]["scheduler_job_id"]  # the job's log, in the sweep dir
    log = (sweep_dir / "submitit" / log_id / f"{log_id}_0_log.err").read_text()
    assert f"rlt: stopped by SIGUSR2 after step {stopped_at} of 8: {first}/checkpoint-{stopped_at} saved" in log
    assert "rlt: preempted: submitit requeues this job, which resumes from that checkpoint" in log
    assert f"rlt: sweep of 2 job(s) in {sweep_dir}" in output and "(2 attempts)" in output

    # each job its own wandb run, which the requeued attempt continues
    (before, after), (other,) = _wandb_runs(first), _wandb_runs(second)
    assert before["id"] == after["id"] == (first / "wandb_id").read_text().strip() != other["id"]
    assert (after["name"], after["group"], after["exit_code"]) == (
        "tiny_sft learning_rate=0.001", "tiny_sft-sweep-learning_rate", 0)
    assert before["exit_code"] == 128 + signal.SIGUSR2 and other["name"] == "tiny_sft learning_rate=0.003"


# ------------------------------------------------------------------------------------------------ Optuna


def test_an_optuna_search_optimizes_the_declared_objective(tmp_path):
    proc = _train(["-m", *FAST, "learning_rate=tag(log,interval(1e-4,1e-1))", "hydra/sweeper=optuna",
                   "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.seed=0",
                   f"results_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweep_dir = tmp_path / "tiny_sft" / "multirun"
    summary = json.loads((sweep_dir / sweeps.SUMMARY_FILE).read_text())
    assert (summary["objective"], summary["direction"]) == ("eval_loss", "minimize")
    assert [job["status"] for job in summary["jobs"]] == ["completed"] * 3
    for job in summary["jobs"]:  # each trial's value is its run's own result
        run = json.loads((Path(job["run_dir"]) / "summary.json").read_text())
        assert job["value"] == run["eval_loss"] and run["hyperparameters"]["learning_rate"] == \
            job["params"]["learning_rate"]
    best = min(summary["jobs"], key=lambda job: job["value"])
    assert summary["best"] == {"job": best["job"], "params": best["params"], "value": best["value"],
                               "run_dir": best["run_dir"]}
    import yaml

    optuna = yaml.safe_load((sweep_dir / sweeps.OPTUNA_RESULTS).read_text())  # Optuna's own record agrees
    assert optuna["best_params"] == best["params"] and optuna["best_value"] == best["value"]
    assert f"best: #{best['job']} learning_rate=" in proc.stdout
