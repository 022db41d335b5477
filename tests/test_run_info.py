"""rlt.run_info.locate: a run dir, its final/ or checkpoint-N, a plain model dir, a hub id; one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rlt.errors import ModelError
from rlt.run_info import check_model_dir, latest_checkpoint, locate

CONFIG = """\
run_name: my_run
algorithm: grpo
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
system_prompt: You are a test tutor.
max_completion_length: 24
temperature: 0.7
top_p: 0.9
top_k: null
min_p: null
repetition_penalty: 1.0
"""


def fake_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "qwen2"}')
    (path / "model.safetensors").write_bytes(b"x")
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "my_run"
    fake_model(run / "checkpoint-2")
    fake_model(run / "checkpoint-10")
    (run / "config.yaml").write_text(CONFIG)
    return run


def test_a_run_dir_means_its_final_model_and_the_runs_settings(run_dir):
    fake_model(run_dir / "final")
    located = locate(str(run_dir))
    assert located.model_dir == str(run_dir / "final") and located.run_dir == run_dir
    assert located.system_prompt == "You are a test tutor." and located.max_new_tokens == 24
    assert (located.sampling.temperature, located.sampling.top_p) == (0.7, 0.9)
    assert located.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and located.label == "my_run/final"


def test_a_run_stopped_before_final_means_its_latest_checkpoint(run_dir):
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-10"  # by step, not by name: 10 > 2
    assert locate(str(run_dir)).model_dir == str(run_dir / "checkpoint-10")


def test_a_checkpoint_dir_takes_its_parents_run(run_dir):
    located = locate(str(run_dir / "checkpoint-2"))
    assert located.model_dir == str(run_dir / "checkpoint-2") and located.has_run and located.algorithm == "grpo"


def test_plain_model_dirs_and_hub_ids_have_no_run(tmp_path):
    plain = fake_model(tmp_path / "some_model")
    assert not locate(str(plain)).has_run and locate(str(plain)).sampling is None
    hub = locate("Qwen/Qwen2.5-0.5B")
    assert hub.model_dir == "Qwen/Qwen2.5-0.5B" and hub.system_prompt is None and hub.max_new_tokens is None


def test_missing_and_damaged_model_dirs_are_one_line_errors(tmp_path, run_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="there is no directory ./nowhere"):
        locate("./nowhere")
    with pytest.raises(ModelError, match="my_run/nope.*local folder"):  # my_run/ exists here: not a hub id
        locate("my_run/nope")
    broken = fake_model(tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="damaged model directory: config.json does not parse"):
        check_model_dir(broken)
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        locate(str(broken))
    with pytest.raises(ModelError, match="not a model directory"):
        locate(str(tmp_path))
    for child in ("checkpoint-2", "checkpoint-10"):
        shutil.rmtree(run_dir / child)
    with pytest.raises(ModelError, match="has no model yet"):
        locate(str(run_dir))


def test_a_real_run_config_validates(tiny_model_path, tmp_path, compose):
    """The config.yaml a training run writes (here: composed tiny_grpo, saved as the run dir does) reads back as
    the validated run."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    shutil.copytree(tiny_model_path, run / "final")
    OmegaConf.save(compose(["run_cfg=tiny_grpo", "system_prompt=Be brief."]), run / "config.yaml")
    located = locate(str(run))
    assert located.run().system_prompt == "Be brief." and located.max_new_tokens == located.run().max_completion_length
