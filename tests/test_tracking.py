"""Experiment tracking: one wandb run per run dir and per sweep job (its id kept in the run dir, resumed with it),
named by the swept values, one group per sweep, the project's config; sweep job dirs named by the swept keys.

wandb runs offline here; what a run recorded is read back from its `.wandb` file (the records `wandb sync` uploads).
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlt.compose import compose
from rlt.train import job_dir_name, parse_job_overrides, sweep_jobs, swept_keys

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "run_cfg=tiny_sft", "report_to=[wandb]", "learning_rate=1e-3,3e-3"]


def _records(path: Path):
    """The protobuf records of a `.wandb` file (a LevelDB-style log: 32 KiB blocks of chunks with 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _wandb_run(offline_dir: Path) -> dict:
    """What one offline wandb run recorded: id, name, group, job type, tags, config, history rows, exit code."""
    (log,) = offline_dir.glob("*.wandb")
    run = {"config": {}, "history": [], "step_metrics": {}, "exit_code": None}
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, name=r.display_name, group=r.run_group, job_type=r.job_type, tags=list(r.tags))
            run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "metric":
            run["step_metrics"][record.metric.name or record.metric.glob_name] = record.metric.step_metric
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def _wandb_runs(run_dir: Path) -> list[dict]:
    """Every wandb run (attempt) written in a run dir, oldest first."""
    return [_wandb_run(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


def _train(args, tmp_path, *, script=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline"}
    entry = ["-c", script] if script else ["-m", "rlt.train"]
    return subprocess.run([sys.executable, *entry, *args, f"results_dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------ sweep job dirs


def test_sweep_job_dirs_are_named_by_the_swept_keys_only():
    jobs = sweep_jobs(["run_cfg=tiny_sft", "learning_rate=1e-3,3e-3", "seed=1,2", "max_steps=4"])
    keys = swept_keys(jobs)
    assert keys == ["learning_rate", "seed"]
    assert [job_dir_name(job, keys) for job in jobs] == [
        "learning_rate=0.001,seed=1", "learning_rate=0.001,seed=2", "learning_rate=0.003,seed=1",
        "learning_rate=0.003,seed=2"]
    # path-valued, quoted, list and placement values: one flat, path-safe name
    assert job_dir_name(["dataset_id_or_path=/data/x.jsonl"], ["dataset_id_or_path"]) == \
        "dataset_id_or_path=data_x.jsonl"
    assert job_dir_name(["dataset_id_or_path=../d/x y.jsonl"], ["dataset_id_or_path"]) == \
        "dataset_id_or_path=.._d_x_y.jsonl"
    assert job_dir_name(["lora_target_modules=[q_proj,v_proj]"], ["lora_target_modules"]) == \
        "lora_target_modules=q_proj,v_proj"
    assert job_dir_name(["model_name_or_path=rlt:tiny", "hydra.verbose=true"], None) == "model_name_or_path=rlt_tiny"
    # keys not known (another sweeper) or a sweep of one job: every override but where the run goes
    assert job_dir_name(["max_steps=2", "results_dir=/tmp/r", "output_dir=/o"], None) == "max_steps=2"
    assert job_dir_name(["results_dir=/tmp/r"], []) == "default"
    # names that would collide, and long ones, get a hash of the full text
    a, b = job_dir_name(["p=a/b"], ["p"], hashed=True), job_dir_name(["p=a_b"], ["p"], hashed=True)
    assert a.startswith("p=a_b-") and b.startswith("p=a_b-") and a != b
    long = job_dir_name([f"system_prompt='{'x' * 300}'"], ["system_prompt"])
    assert len(long) == 120 and "/" not in long
    assert parse_job_overrides(["+x@pkg='a b'", "hydra.job.chdir=true"]) == [("x@pkg", "a b", "a b")]


def test_a_path_valued_sweep_makes_no_nested_dirs(tmp_path):
    out = tmp_path / "out"
    proc = _train(["-m", "run_cfg=tiny_sft", "dataset_id_or_path=/data/x.jsonl,rel/dir/y.jsonl", "learning_rate=1e-3",
                   f"output_dir={out}", "--print-config"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "tiny_sft" / "multirun"
    names = ["dataset_id_or_path=data_x.jsonl", "dataset_id_or_path=rel_dir_y.jsonl"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == names
    # an explicit output_dir gets the same subdir per job (rlt.train.resolve_output_dir)
    printed = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("output_dir: ")]
    assert printed == [str(out / n) for n in names]


# ------------------------------------------------------------------------------------------------ wandb, in-process


def test_the_wandb_id_lives_in_the_run_dir(tmp_path):
    from rlt.tracking import wandb_run_id

    run_dir = tmp_path / "run"
    first = wandb_run_id(run_dir)
    assert (run_dir / "wandb_id").read_text().strip() == first and len(first) == 8
    assert wandb_run_id(run_dir) == first  # a resumed run continues its own wandb run
    shutil.rmtree(run_dir)
    assert wandb_run_id(run_dir) != first  # a new run dir is a new wandb run
    (run_dir / "wandb_id").write_text("not an id!\n")
    assert wandb_run_id(run_dir) != "not an id!"
    # a run dir from before the id file: the id of its latest wandb run
    old = tmp_path / "old"
    for name in ("run-20250101_120000-aaa111", "offline-run-20250102_080000-0123456789ab", "latest-run"):
        (old / "wandb" / name).mkdir(parents=True)
    assert wandb_run_id(old) == "0123456789ab" == (old / "wandb_id").read_text().strip()


def test_wandb_mode_disabled_starts_no_run(tmp_path):
    from rlt.tracking import configure_reporting

    run = compose("tiny_sft", ["report_to=[wandb,tensorboard]", "wandb_mode=disabled"])
    assert configure_reporting(run, str(tmp_path)) == ["tensorboard"]
    assert not (tmp_path / "wandb_id").exists()


def test_outside_a_sweep_no_swept_values_and_no_group():
    from rlt.tracking import swept_values, wandb_group, wandb_run_name, wandb_tags

    run = compose("tiny_sft", ["wandb_tags=[mine]"])
    assert swept_values() == {}
    assert wandb_run_name(run) == "tiny_sft" and wandb_group(run) is None
    assert wandb_tags(run) == ["sft", "rlt:tiny", "mine"]  # no run file without Hydra's choices
    assert wandb_group(compose("tiny_sft", ["wandb_group=g"])) == "g"


def test_a_run_records_the_project_config_on_top_and_the_step_axis(tmp_path):
    """What `WandbConfigCallback` adds once transformers' WandbCallback set the run up; and `finish_reporting`'s exit
    codes, the same id when the run dir is opened again."""
    import wandb

    from rlt.tracking import WandbConfigCallback, configure_reporting, finish_reporting

    run = compose("tiny_sft", ["report_to=[wandb]", "wandb_mode=offline", f"output_dir={tmp_path}"])
    assert configure_reporting(run, str(tmp_path)) == ["wandb"]
    wandb.config.update({"torch_dtype": "bfloat16", "learning_rate": 9.0}, allow_val_change=True)  # as TRL's args
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    WandbConfigCallback(run).on_train_begin(SimpleNamespace(report_to=["wandb"]), state, None)
    finish_reporting(0)
    assert wandb.run is None
    assert configure_reporting(run, str(tmp_path)) == ["wandb"]  # the same run dir again: the same wandb run
    finish_reporting(143)
    wandb.teardown()  # wandb-core writes the offline log after `finish` returns: wait for it

    first, second = _wandb_runs(tmp_path)
    assert first["id"] == second["id"] == (tmp_path / "wandb_id").read_text().strip()
    assert (first["name"], first["group"], first["job_type"]) == ("tiny_sft", "", "sft")
    assert first["config"]["torch_dtype"] == run.torch_dtype and first["config"]["learning_rate"] == run.learning_rate
    assert first["config"]["run_name"] == "tiny_sft" and first["config"]["synthetic"]["num_train"] == 400
    assert first["step_metrics"]["*"] == "train/global_step"
    assert {"train/global_step": 3}.items() <= first["history"][0].items()
    assert (first["exit_code"], second["exit_code"]) == (0, 143)


# ------------------------------------------------------------------------------------------------ wandb, sweeps


def test_each_sweep_job_is_its_own_wandb_run_and_resumes_it(tmp_path):
    proc = _train([*SWEEP, "max_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "tiny_sft" / "multirun"
    jobs = [sweep_dir / "learning_rate=0.001", sweep_dir / "learning_rate=0.003"]
    assert sorted(p for p in sweep_dir.iterdir() if p.is_dir()) == jobs
    runs = {}
    for job, rate in zip(jobs, ("0.001", "0.003"), strict=True):
        (run,) = _wandb_runs(job)
        assert run["id"] == (job / "wandb_id").read_text().strip()
        assert run["name"] == f"tiny_sft learning_rate={rate}"
        assert run["group"] == "tiny_sft-sweep-learning_rate" and run["job_type"] == "sft"
        assert {"sft", "tiny_sft", "rlt:tiny"} <= set(run["tags"])
        config = run["config"]
        assert (config["run_name"], config["learning_rate"], config["algorithm"]) == ("tiny_sft", float(rate), "sft")
        assert (config["run_cfg"], config["model_cfg"], config["trainer_cfg"]) == ("tiny_sft", "tiny", "sft")
        assert config["output_dir"] == str(job)
        assert run["step_metrics"]["*"] == "train/global_step" and run["exit_code"] == 0
        assert [row["train/global_step"] for row in run["history"] if "train/loss" in row] == [1, 2]
        runs[rate] = run
    assert runs["0.001"]["id"] != runs["0.003"]["id"]

    # the same sweep with more steps: the kept job resumes its wandb run, a deleted job dir starts a new one
    shutil.rmtree(jobs[1])
    proc = _train([*SWEEP, "max_steps=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, resumed = _wandb_runs(jobs[0])
    assert resumed["id"] == first["id"] and resumed["name"] == first["name"] and resumed["exit_code"] == 0
    assert [row["train/global_step"] for row in resumed["history"] if "train/loss" in row] == [3]
    (fresh,) = _wandb_runs(jobs[1])
    assert fresh["id"] != runs["0.003"]["id"] and fresh["group"] == first["group"]


FAIL_THE_FIRST_JOB = """
import transformers
train_step = transformers.Trainer.training_step
def failing(self, *args, **kwargs):
    if self.args.learning_rate == 1e-3:
        raise RuntimeError("injected failure")
    return train_step(self, *args, **kwargs)
transformers.Trainer.training_step = failing
from rlt.train import main
main()
"""


def test_a_failed_job_is_marked_failed_and_the_next_job_has_its_own_run(tmp_path):
    proc = _train([*SWEEP, "max_steps=2"], tmp_path, script=FAIL_THE_FIRST_JOB)
    assert proc.returncode != 0 and "injected failure" in proc.stderr, proc.stderr[-3000:]
    sweep_dir = tmp_path / "tiny_sft" / "multirun"
    (failed,) = _wandb_runs(sweep_dir / "learning_rate=0.001")
    (next_job,) = _wandb_runs(sweep_dir / "learning_rate=0.003")
    assert failed["exit_code"] == 1 and next_job["exit_code"] == 0
    assert failed["id"] != next_job["id"] and next_job["name"] == "tiny_sft learning_rate=0.003"
    assert [row["train/global_step"] for row in next_job["history"] if "train/loss" in row] == [1, 2]
    assert json.loads((sweep_dir / "learning_rate=0.003" / "summary.json").read_text())["global_step"] == 2


@pytest.fixture(autouse=True)
def _no_wandb_run_left():
    yield
    if "rlt.tracking" in sys.modules:  # a test that failed half-way leaves no wandb run open for the next
        sys.modules["rlt.tracking"].finish_reporting(1)
