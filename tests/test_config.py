"""Every shipped config composes and validates; each validation rule fails with a message naming the key."""

import subprocess
import sys

import pytest

from rlt.config import SFTRunConfig, validate
from rlt.errors import ConfigError

from .conftest import REPO

RUN_CFGS = sorted(p.stem for p in (REPO / "cfgs" / "run_cfg").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (REPO / "cfgs" / g).glob("*.yaml"))
          for g in ("model_cfg", "data_cfg", "trainer_cfg", "reward_cfg")}
# a tiny run of the matching algorithm for each trainer / reward option
BASE_RUN = {"sft": "tiny_sft", "grpo": "tiny_grpo", "teacher_grpo": "teacher_rlt_tiny",
            "grpo_mono_85gb": "teacher_rlt_mono_85gb", "gsm8k": "tiny_grpo", "teacher_logprob_kl": "teacher_rlt_tiny"}


@pytest.mark.parametrize("run_cfg", RUN_CFGS)
def test_every_run_config_validates(compose, run_cfg):
    overrides = [f"run_cfg={run_cfg}"]
    if run_cfg.startswith("text"):
        overrides.append("dataset_id_or_path=corpus.txt")
    if run_cfg.startswith("student"):  # the distilled data is the user's (python -m rlt.distill)
        overrides.append("dataset_id_or_path=distilled.jsonl")
    run = validate(compose(overrides))
    assert run.run_name and run.gradient_accumulation_steps >= 1


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_with_a_tiny_run(compose, group, option):
    run_cfg = BASE_RUN.get(option, "tiny_sft")
    overrides = [f"run_cfg={run_cfg}", f"{group}={option}"]
    if "???" in (REPO / "cfgs" / group / f"{option}.yaml").read_text():
        overrides.append("dataset_id_or_path=data.jsonl")
    validate(compose(overrides))


def test_run_file_and_command_line_order(compose):
    """train.yaml < groups < run file < command line: tiny_sft sets max_steps 20, the CLI wins."""
    assert validate(compose(["run_cfg=tiny_sft"])).max_steps == 20
    run = validate(compose(["run_cfg=tiny_sft", "max_steps=300", "learning_rate=1e-6"]))
    assert (run.max_steps, run.learning_rate) == (300, 1e-6)


def test_derived_gradient_accumulation(compose):
    """GA = train_batch_size / (per_device × world) = 32 / (4 × 1) = 8; with WORLD_SIZE=2 it is 4."""
    assert validate(compose(["run_cfg=tiny_sft", "train_batch_size=32", "per_device_train_batch_size=4"])
                    ).gradient_accumulation_steps == 8


def test_world_size_enters_geometry(compose, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = validate(compose(["run_cfg=tiny_sft", "train_batch_size=32", "per_device_train_batch_size=4"]))
    assert run.gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match=r"train_batch_size=12 is not divisible by .*=4 × world size 2 = 8"):
        validate(compose(["run_cfg=tiny_sft", "train_batch_size=12", "per_device_train_batch_size=4"]))


BAD = [
    (["+max_stepz=3"], r"max_stepz: unknown key \(did you mean max_steps"),
    (["max_steps=abc"], r"max_steps='abc': wrong type"),
    (["learning_rate=-1e-5"], r"learning_rate=-1e-05 must be > 0"),
    (["max_steps=0"], r"max_steps=0 must be > 0"),
    (["train_batch_size=10", "per_device_train_batch_size=4"],
     r"train_batch_size=10 is not divisible by per_device_train_batch_size=4 × world size 1 = 4"),
    (["gradient_accumulation_steps=3"], r"gradient_accumulation_steps=3 contradicts train_batch_size=8 .* = 2"),
    (["torch_dtype=fp8"], r"torch_dtype='fp8' is not one of"),
    (["data_format=csv"], r"data_format='csv' is not one of"),
    (["lr_scheduler_type=cosinus"], r"lr_scheduler_type='cosinus' is not one of"),
    (["report_to=[wandb,mlflow]"], r"report_to='mlflow' is not one of"),
    (["warmup_ratio=1.5"], r"warmup_ratio=1.5 must be in \[0, 1\)"),
    (["lora_dropout=1.0"], r"lora_dropout=1.0 must be in \[0, 1\)"),
    (["load_in_4bit=true"], r"load_in_4bit=true .* set use_peft=true"),
    (["eval_fraction=1.0"], r"eval_fraction=1.0 must be in \[0, 1\)"),
    (["early_stopping_patience=2", "eval_steps=null"], r"early_stopping_patience needs eval_steps"),
    (["early_stopping_patience=2", "eval_steps=4", "save_steps=10"],
     r"save_steps=10 must be a multiple of eval_steps=4"),
    (["data_cfg=text_corpus"], r"dataset_id_or_path: missing value"),
    (["data_cfg=text_corpus", "dataset_id_or_path=x.txt", "completion_only_loss=true"],
     r"completion_only_loss=true needs prompt/completion data"),
    (["run_name=a/b"], r"run_name='a/b' must be a non-empty name without '/'"),
    (["+algorithm=ppo"], None),  # algorithm exists already: Hydra refuses '+'; tested below with a dict
]


@pytest.mark.parametrize("overrides,message", [b for b in BAD if b[1]])
def test_bad_config_is_one_clear_message(compose, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate(compose(["run_cfg=tiny_sft", *overrides]))
    assert str(e.value).startswith("invalid config:")


def test_all_problems_are_reported_together(compose):
    with pytest.raises(ConfigError) as e:
        validate(compose(["run_cfg=tiny_sft", "learning_rate=-1", "max_steps=0", "torch_dtype=x"]))
    text = str(e.value)
    assert "learning_rate" in text and "max_steps" in text and "torch_dtype" in text


def test_unknown_algorithm_and_foreign_keys():
    base = {f: getattr(SFTRunConfig, f) for f in ("learning_rate",)}
    with pytest.raises(ConfigError, match=r"algorithm='ppo' is not one of"):
        validate({**base, "algorithm": "ppo"})


def test_cli_reports_config_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlt.train", "run_cfg=tiny_sft", "learning_rate=-1",
                           f"results_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "learning_rate=-1.0 must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_print_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlt.train", "run_cfg=tiny_sft", "max_steps=7", "--print-config",
                           f"results_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 7" in proc.stdout and "gradient_accumulation_steps: 2" in proc.stdout
    assert f"output_dir: {tmp_path}/tiny_sft" in proc.stdout


def test_sweep_jobs_expand_like_hydras_basic_sweeper():
    """Two sweep keys of 2 and 3 values and one fixed key: 2 × 3 = 6 jobs, the last key varying fastest."""
    from rlt.train import sweep_jobs

    jobs = sweep_jobs(["a=1,2", "b=x", "c=p,q,r"])
    assert jobs[:2] == [["a=1", "b=x", "c=p"], ["a=1", "b=x", "c=q"]] and len(jobs) == 6
    assert jobs[-1] == ["a=2", "b=x", "c=r"]
    assert sweep_jobs(["a=1"]) == [["a=1"]]
    with pytest.raises(ConfigError, match="cannot read the sweep"):
        sweep_jobs(["a=[1,"])


def _train(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "rlt.train", *args, f"results_dir={tmp_path}", "report_to=[none]"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_multirun_checks_every_job_before_the_first_starts(tmp_path):
    proc = _train("-m", "run_cfg=tiny_sft", "max_steps=1", "learning_rate=1e-3,-1", "model_cfg=tiny,nope",
                  tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "3 of 4 sweep jobs have an invalid config (no job was started)" in proc.stderr
    assert "job #1 (run_cfg=tiny_sft max_steps=1 learning_rate=0.001 model_cfg=nope" in proc.stderr
    assert "learning_rate=-1.0 must be > 0" in proc.stderr and "Could not find 'model_cfg/nope'" in proc.stderr
    assert "job #0" not in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def test_unknown_key_on_the_command_line_is_named_with_a_suggestion(tmp_path):
    proc = _train("run_cfg=tiny_sft", "lerning_rate=1e-3", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "lerning_rate: unknown key (did you mean learning_rate?)" in proc.stderr
    assert "+lerning_rate" not in proc.stderr and "Traceback" not in proc.stderr
