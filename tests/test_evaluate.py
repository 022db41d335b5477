"""`python -m rlt.evaluate`: grading, a real GSM8K slice with the tiny (random) model, pass@k, LoRA merge, CLI errors;
the decoding it uses (`rlt.generation.sampling`) on both backends."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlt.checkpoints import write_json_atomic
from rlt.errors import ConfigError
from rlt.evaluate import _grade, evaluate, gsm8k_accuracy, main, pass_at_k
from rlt.generation.sampling import GREEDY, Sampling, generate_hf_ids, generate_vllm_ids, make_vllm_engine
from rlt.models import is_lora_adapter, load_eval_model

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 0, 1, 0.0),  # no correct sample
    (5, 5, 3, 1.0),  # all correct
    (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (10, 1, 3, 0.3),  # 1 - C(9,3)/C(10,3) = 1 - 84/120
    (10, 3, 8, 1.0),  # n - c = 7 < k = 8: every draw of 8 holds a correct sample
    (4, 1, 4, 1.0),  # n == k: pass@k is "any correct"
    (1, 0, 1, 0.0),
    (200, 0, 100, 0.0),  # big binomials stay exact
])
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 1, 0), (5, 1, 6), (5.0, 1, 1), (5, True, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------------------- grading


@pytest.mark.parametrize(("completion", "answer", "graded"), [
    ("<answer>\n19\n</answer>", "19", (2.0, "19")),  # in the tags: correct and strict
    ("<answer>1,234</answer>", "1234", (2.0, "1,234")),  # math-verify: "1,234" == "1234"
    ("<answer>3/4</answer>", "0.75", (2.0, "3/4")),
    ("<answer>\\boxed{12}</answer>", "12", (2.0, "\\boxed{12}")),
    ("so 3 + 4 = 7\n#### 7", "7", (1.0, "7")),  # after ####: correct, not strict
    ("it is 1,234.", "1234", (1.0, "1,234")),  # the last number: correct, not strict
    ("<answer>x</answer> so 12", "12", (1.0, "12")),  # a wrong tagged answer, the right last number
    ("<answer>-5</answer>", "5", (0.0, "-5")),  # wrong: what it said is still reported
    ("no answer here", "5", (0.0, None)),
])
def test_grade_is_the_training_reward_checker(completion, answer, graded):
    assert _grade(completion, answer) == graded


def _stub_generation(monkeypatch, greedy: list[str], sampled: list[list[str]] | None = None):
    """Generation replaced by fixed completions (prompts rendered as their last message; a completion's token ids
    are its characters' code points), so that what `evaluate` reports comes from the grader alone."""
    import rlt.evaluate as evaluate_mod

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return messages[-1]["content"]

        def batch_decode(self, rows, skip_special_tokens):
            return ["".join(map(chr, ids)) for ids in rows]

    def ids(text):
        return [ord(ch) for ch in text]

    def backend(model, torch_dtype, stack):
        def generate(texts, *, num_samples, sampling, **options):
            if sampling is GREEDY:
                assert num_samples == 1 and len(texts) == len(greedy)
                return [[ids(c)] for c in greedy]
            assert sampled is not None and len(texts) == len(sampled)
            assert all(len(row) == num_samples for row in sampled)
            return [[ids(c) for c in row] for row in sampled]

        return Tokenizer(), generate

    monkeypatch.setattr(evaluate_mod, "_hf_backend", backend)


def test_evaluate_scores_with_the_grader(tmp_path, monkeypatch):
    """By hand: greedy completions scored 2, 1, 2, 0 -> accuracy 3/4, strict (in the tags) 2/4; samples correct 1,
    3, 0, 1 of 3 -> pass@2 = mean(1 - 1/3, 1, 0, 1 - 1/3) = 7/12."""
    answers = ["19", "7", "1234", "5"]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"question": f"question {i}", "answer": f"#### {a}"})
                                                 + "\n" for i, a in enumerate(answers)))
    greedy = ["<answer>\n19\n</answer>", "so 3 + 4 = 7\n#### 7", "<answer>1,234</answer>", "<answer>-5</answer>"]
    sampled = [["<answer>19</answer>", "no answer here", "<answer>20</answer>"],
               ["#### 7", "7", "<answer>7</answer>"],
               ["no", "12", "<answer>1235</answer>"],
               ["<answer>3/4</answer>", "it is 5.", "x"]]
    _stub_generation(monkeypatch, greedy, sampled)
    results = evaluate(model="stub", data=str(tmp_path), k=2, num_samples=3, temperature=1.0)
    assert results["n"] == 4 and results["accuracy"] == 0.75 and results["strict_accuracy"] == 0.5
    assert results["pass_at_k"] == pytest.approx(7 / 12)
    assert results["mean_completion_tokens"] == sum(map(len, greedy)) / 4  # the stub's tokens are characters
    assert results["max_new_tokens"] == 256 and results["system_prompt"] is None  # no run: the defaults
    got = [(p["score"], p["predicted"], p["correct"], p["samples_correct"]) for p in results["predictions"]]
    assert got == [(2.0, "19", True, 1), (1.0, "7", True, 3), (2.0, "1,234", True, 0), (0.0, "-5", False, 1)]
    assert [p["answer"] for p in results["predictions"]] == answers
    expected = [[g, *s] for g, s in zip(greedy, sampled, strict=True)]  # greedy first, then the samples
    assert [p["completions"] for p in results["predictions"]] == expected


def test_gsm8k_accuracy_scores_with_the_grader(monkeypatch):
    """The SFT recipe's accuracy: correct when the grader gives any credit (the #### answer counts)."""
    import rlt.evaluate as evaluate_mod

    completions = ["<answer>4</answer>", "#### 4", "<answer>5</answer>"]
    monkeypatch.setattr(evaluate_mod, "render_prompts", lambda tokenizer, problems: [str(p) for p in problems])
    monkeypatch.setattr(evaluate_mod, "generate_hf", lambda model, tokenizer, texts, **kw: [[c] for c in completions])
    result = gsm8k_accuracy(None, None, [{"prompt": [], "answer": "4"}] * 3)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert [(p["predicted"], p["correct"]) for p in result["predictions"]] == [("4", True), ("4", True), ("5", False)]


def test_write_json_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "r.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": "é"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": "é"}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


# ------------------------------------------------------------------------------------------------ real GSM8K


def _gsm8k_first_answers(gsm8k_dir, n):
    from rlt.data.formats import gsm8k_final_answer

    with open(gsm8k_dir / "test.jsonl", encoding="utf-8") as f:
        return [gsm8k_final_answer(json.loads(line)["answer"]) for line, _ in zip(f, range(n), strict=False)]


def test_cli_on_a_20_problem_gsm8k_slice(tmp_path, capsys, gsm8k_dir):
    out = tmp_path / "results.json"
    status = main(["--model", "rlt:tiny", "--data", str(gsm8k_dir), "--split", "test", "--limit", "20",
                   "--max-new-tokens", "16", "--batch-size", "10", "--output", str(out)])
    assert status == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["model"] == "rlt:tiny" and results["data"] == str(gsm8k_dir) and results["split"] == "test"
    assert results["n"] == 20 and len(results["predictions"]) == 20
    assert results["backend"] == "hf" and "pass_at_k" not in results
    assert 0.0 <= results["strict_accuracy"] <= results["accuracy"] <= 1.0
    assert results["accuracy"] == sum(p["correct"] for p in results["predictions"]) / 20
    assert [p["answer"] for p in results["predictions"]] == _gsm8k_first_answers(gsm8k_dir, 20)  # first 20, file order
    for p in results["predictions"]:
        assert set(p) >= {"question", "prompt", "completions", "predicted", "answer", "correct"}
        assert p["question"] in p["prompt"] and p["prompt"].endswith("<|im_start|>assistant\n")
        assert len(p["completions"]) == 1 and isinstance(p["completions"][0], str)
        assert isinstance(p["correct"], bool)
    assert [f.name for f in tmp_path.iterdir()] == ["results.json"]  # atomic write left no temp file
    printed = capsys.readouterr().out
    assert "accuracy" in printed and printed.count("- question:") == 3 and str(out) in printed


def test_pass_at_k_samples_and_system_prompt(gsm8k_dir):
    results = evaluate(model="rlt:tiny", data=str(gsm8k_dir), limit=3, k=2, num_samples=3, temperature=1.0,
                       max_new_tokens=8, batch_size=4, system_prompt="@reasoning")
    assert results["k"] == 2 and results["num_samples"] == 3 and results["temperature"] == 1.0
    assert (results["top_p"], results["top_k"], results["min_p"]) == (1.0, None, None)
    assert 0.0 <= results["pass_at_k"] <= 1.0
    for p in results["predictions"]:
        assert len(p["completions"]) == 4  # greedy first, then 3 samples
        assert 0 <= p["samples_correct"] <= 3
        assert "<|im_start|>system\nRespond in the following format" in p["prompt"]
    assert results["pass_at_k"] == pytest.approx(
        sum(pass_at_k(3, p["samples_correct"], 2) for p in results["predictions"]) / 3)


# --------------------------------------------------------------------------------------------------- sampling


def test_sampling_translates_to_both_backends():
    """By hand: temperature 0 is greedy on both (HF do_sample False; vLLM temperature 0 with every filter off, and
    repetition_penalty kept: it changes greedy output too); off-filters are top_k None -> 0 on both, min_p None ->
    None for HF (no warper) and 0.0 for vLLM (its "off")."""
    assert GREEDY.hf_kwargs() == {"do_sample": False, "repetition_penalty": 1.0}
    assert Sampling(repetition_penalty=1.3).vllm_kwargs() == {"temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                                              "min_p": 0.0, "repetition_penalty": 1.3}
    s = Sampling(temperature=0.7, top_k=20)
    assert s.hf_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 20, "min_p": None,
                             "repetition_penalty": 1.0}
    s = Sampling(temperature=0.7, top_p=0.9, min_p=0.05)
    assert s.vllm_kwargs() == {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.05,
                               "repetition_penalty": 1.0}
    assert s.describe() == "temperature 0.7, top_p 0.9, min_p 0.05"
    assert Sampling(1.0, repetition_penalty=1.1).describe() == "temperature 1.0, repetition_penalty 1.1"
    assert GREEDY.describe() == "greedy" and GREEDY.greedy and not s.greedy


def test_sampling_from_a_run_config(compose):
    from rlt.config import validate

    run = validate(compose(["run_cfg=teacher_rlt_tiny", "top_p=0.95", "top_k=40", "min_p=0.1",
                            "repetition_penalty=1.05", "temperature=0.8"]))
    assert Sampling.from_run(run) == Sampling(0.8, top_p=0.95, top_k=40, min_p=0.1, repetition_penalty=1.05)
    assert Sampling.from_run(run, temperature=0.0).greedy  # an explicit temperature wins, the filters stay


@pytest.mark.parametrize(("sampling", "named"), [
    (Sampling(-0.1), "temperature"), (Sampling(1.0, top_p=0.0), "top_p"), (Sampling(1.0, top_p=1.5), "top_p"),
    (Sampling(1.0, top_k=0), "top_k"), (Sampling(1.0, top_k=2.5), "top_k"), (Sampling(1.0, min_p=1.5), "min_p"),
    (Sampling(1.0, repetition_penalty=0), "repetition_penalty"), (Sampling(float("nan")), "temperature"),
])
def test_sampling_problems_name_the_field(sampling, named):
    assert len(sampling.problems()) == 1 and sampling.problems()[0].startswith(named)


def _top_k_1_is_greedy(generate):
    """Sampling with top_k 1 keeps only the argmax token, so every sample equals the greedy completion; without
    the filter, temperature-1 samples of a random model differ from it (so the filter is what is applied)."""
    texts = ["<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n", "Hello there, friend"]
    greedy = generate(texts, num_samples=1, sampling=GREEDY, seed=0)
    top1 = generate(texts, num_samples=3, sampling=Sampling(1.0, top_k=1), seed=0)
    free = generate(texts, num_samples=3, sampling=Sampling(1.0), seed=0)
    assert all(len(g) == 1 and g[0] for g in greedy)
    assert top1 == [[g[0]] * 3 for g in greedy]
    assert free != top1


def test_hf_sampling_filters_are_applied(tiny_model_path):
    from rlt.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path, padding_side="left")
    model = load_model(tiny_model_path, tokenizer=tokenizer)
    _top_k_1_is_greedy(lambda texts, **kw: generate_hf_ids(model, tokenizer, texts, max_new_tokens=12,
                                                           batch_size=8, **kw))


@pytest.mark.vllm
def test_vllm_sampling_filters_are_applied(tiny_model_path):
    pytest.importorskip("vllm")
    from rlt.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path, padding_side="left")
    llm = make_vllm_engine(tiny_model_path, kv_cache_memory_bytes=32 << 20, max_model_len=256)
    _top_k_1_is_greedy(lambda texts, **kw: generate_vllm_ids(llm, tokenizer, texts, max_new_tokens=12, **kw))


def _forward_logprobs(model, tokenizer, text: str, ids: list[int], temperature: float) -> list[float]:
    """The obviously-correct value: one forward over prompt + completion, log_softmax(logits / T) at each token."""
    import torch

    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()


def _sampling_logprobs_match_a_forward(generate, model, tokenizer):
    """Prompts of different lengths (left padding), 2 samples each, T = 0.7: every sampled token's log-prob equals
    the forward's within 1e-4; a filtered sampling is refused (its log-probs would not be log_softmax(logits/T))."""
    texts = ["<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n", "Hello"]
    ids, logprobs = generate(texts, num_samples=2, sampling=Sampling(0.7), seed=0, return_logprobs=True)
    assert [len(row) for row in ids] == [2, 2] and [len(row) for row in logprobs] == [2, 2]
    for text, row_ids, row_lps in zip(texts, ids, logprobs, strict=True):
        for sample, lps in zip(row_ids, row_lps, strict=True):
            assert len(lps) == len(sample) > 0
            assert lps == pytest.approx(_forward_logprobs(model, tokenizer, text, sample, 0.7), abs=1e-4)
    with pytest.raises(ValueError, match="plain tempered sampling; got temperature 0.7, top_k 5"):
        generate(texts, num_samples=1, sampling=Sampling(0.7, top_k=5), seed=0, return_logprobs=True)


def test_hf_sampling_logprobs_match_a_forward(tiny_model_path):
    from rlt.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path, padding_side="left")
    model = load_model(tiny_model_path, tokenizer=tokenizer)
    _sampling_logprobs_match_a_forward(
        lambda texts, **kw: generate_hf_ids(model, tokenizer, texts, max_new_tokens=12, batch_size=8, **kw),
        model, tokenizer)


@pytest.mark.vllm
def test_vllm_sampling_logprobs_match_a_forward(tiny_model_path):
    pytest.importorskip("vllm")
    from rlt.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path, padding_side="left")
    model = load_model(tiny_model_path, tokenizer=tokenizer)
    llm = make_vllm_engine(tiny_model_path, kv_cache_memory_bytes=32 << 20, max_model_len=256,
                           dtype="float32")  # the HF model's (vLLM's CPU default for "auto" is bfloat16)
    _sampling_logprobs_match_a_forward(
        lambda texts, **kw: generate_vllm_ids(llm, tokenizer, texts, max_new_tokens=12, **kw), model, tokenizer)


def test_sampling_plain_is_what_has_plain_logprobs():
    assert Sampling(0.7).plain and Sampling(1.0, top_p=1.0, top_k=None, min_p=0.0).plain
    assert not any(s.plain for s in (GREEDY, Sampling(0.7, top_p=0.9), Sampling(0.7, top_k=20),
                                     Sampling(0.7, min_p=0.05), Sampling(0.7, repetition_penalty=1.1)))


def test_gsm8k_accuracy_api_for_the_sft_recipe(tiny_model_path):
    from rlt.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    model = load_model(tiny_model_path, tokenizer=tokenizer)
    model.train()
    problems = [{"prompt": [{"role": "user", "content": "What is 2 plus 2?"}], "answer": "4"}] * 3
    result = gsm8k_accuracy(model, tokenizer, problems, max_new_tokens=4, batch_size=2)
    assert result["n"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    assert set(result["predictions"][0]) == {"prompt", "completion", "predicted", "answer", "correct"}
    assert model.training  # mode restored


# -------------------------------------------------------------------------------------------------------- LoRA


def test_lora_adapter_is_detected_and_merged(tmp_path, tiny_model_path, gsm8k_dir):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from rlt.models import load_model

    key = "model.layers.0.self_attn.q_proj.weight"
    base_weight = load_model(tiny_model_path).state_dict()[key].clone()
    # init_lora_weights=False: random A and B, so the merged weights differ from the base (B = 0 by default).
    peft_model = get_peft_model(load_model(tiny_model_path), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    expected = peft_model.merge_and_unload().state_dict()[key]
    assert is_lora_adapter(str(adapter)) and not is_lora_adapter(tiny_model_path)

    model, tokenizer = load_eval_model(str(adapter))
    assert not isinstance(model, PeftModel)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not torch.allclose(model.state_dict()[key], base_weight)
    torch.testing.assert_close(model.state_dict()[key], expected)

    out = tmp_path / "lora.json"
    assert main(["--model", str(adapter), "--data", str(gsm8k_dir), "--limit", "2", "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 2


def test_lora_adapter_with_missing_base_is_a_clean_error(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone"),
                                                             "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # an adapter dir as saved, so its base is what fails
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert main(["--model", str(adapter), "--data", str(data), "--split", "train",
                 "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: LoRA adapter") and "gone" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------- CLI errors


def test_cli_missing_model_dir_exits_2_without_traceback(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "rlt.evaluate", "--model", str(tmp_path / "no-such-model"),
                           "--data", str(data), "--split", "train", "--output", str(tmp_path / "r.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: there is no directory") and "no-such-model" in last
    assert not (tmp_path / "r.json").exists()


def test_cli_data_without_columns_exits_2(tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text(json.dumps({"q": "1+1?", "a": "#### 2"}) + "\n")
    assert main(["--model", "rlt:tiny", "--data", str(tmp_path), "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no column 'question'" in err and "\n" not in err


@pytest.mark.parametrize("args", [
    ["--k", "3", "--temperature", "0"],
    ["--k", "2", "--top-k", "0"],
    ["--k", "2", "--top-p", "1.5"],
    ["--k", "4", "--num-samples", "2"],
    ["--limit", "0"],
    ["--split", "validation"],
])
def test_cli_bad_options_exit_2(tmp_path, capsys, args):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert main(["--model", "rlt:tiny", "--data", str(tmp_path), "--output", str(tmp_path / "r.json"), *args]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ------------------------------------------------------------------------------------------- following the run

TUTOR = "You are a test tutor."


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """One tiny GRPO run (1 step) with a non-default system prompt and completion length, shared by this module."""
    from rlt.compose import compose_raw
    from rlt.train import run_training

    out = tmp_path_factory.mktemp("evalrun") / "run"
    run_training(compose_raw(["run_cfg=tiny_grpo", "max_steps=1", "save_steps=1", "train_batch_size=4",
                              "per_device_train_batch_size=4", "num_generations=4", "max_completion_length=24",
                              f"system_prompt={TUTOR}", "plots=false", f"output_dir={out}"]))
    return out


@pytest.fixture
def generate_spy(monkeypatch):
    """The max_new_tokens of every generate call `rlt.evaluate` makes (HF backend)."""
    import rlt.evaluate as evaluate_mod

    calls = []
    real = evaluate_mod.generate_hf_ids

    def spy(model, tokenizer, texts, **kw):
        calls.append(kw["max_new_tokens"])
        return real(model, tokenizer, texts, **kw)

    monkeypatch.setattr(evaluate_mod, "generate_hf_ids", spy)
    return calls


def test_evaluate_a_run_follows_its_prompt_length_and_data(grpo_run, generate_spy, caplog, capsys):
    from rlt.data.loading import prepare_gsm8k_eval
    from rlt.run_info import read_run_config

    with caplog.at_level(logging.INFO, logger="rlt.evaluate"):
        assert main([str(grpo_run), "--limit", "3"]) == 0  # the model as the argument, no other flag
    out = grpo_run / "eval" / "synthetic-arithmetic_test.json"
    results = json.loads(out.read_text())
    assert str(out) in capsys.readouterr().out
    assert (results["data"], results["split"], results["n"]) == ("synthetic:arithmetic", "test", 3)
    assert results["system_prompt"] == TUTOR and results["max_new_tokens"] == 24 and generate_spy == [24]
    assert results["model_dir"] == str(grpo_run / "final") and results["run_dir"] == str(grpo_run)
    for p in results["predictions"]:
        assert p["prompt"].startswith(f"<|im_start|>system\n{TUTOR}<|im_end|>\n<|im_start|>user\n")
        assert 1 <= p["completion_tokens"] <= 24
    # the run's own held-out problems: its synthetic parameters and seed, not the synthetic defaults
    config = read_run_config(grpo_run)
    own = prepare_gsm8k_eval(dataset_id_or_path="synthetic:arithmetic", split="test", synthetic=config["synthetic"],
                             seed=config["seed"])
    assert [p["question"] for p in results["predictions"]] == [p["question"] for p in own[:3]]
    followed = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Following run"))
    for part in ("data synthetic:arithmetic (dataset_id_or_path)", "split test (eval_split)",
                 f"system prompt {TUTOR!r} (system_prompt)", "max_new_tokens 24 (max_completion_length)"):
        assert part in followed


def test_flags_override_the_run(grpo_run, generate_spy, tmp_path):
    out = tmp_path / "r.json"
    data = REPO / "tests" / "fixtures" / "data" / "gsm8k_style.jsonl"
    assert main(["--model", str(grpo_run / "final"), "--data", str(data), "--split", "train", "--system-prompt",
                 "@reasoning", "--max-new-tokens", "5", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert (results["data"], results["split"], results["n"], generate_spy) == (str(data), "train", 3, [5])
    assert all("<|im_start|>system\nRespond in the following format" in p["prompt"] for p in results["predictions"])
    assert results["from_run"] == []  # every setting was given

    assert main([str(grpo_run), "--system-prompt", "", "--limit", "1", "--output", str(out)]) == 0  # '' = none
    results = json.loads(out.read_text())
    assert results["system_prompt"] is None and results["max_new_tokens"] == 24
    assert results["predictions"][0]["prompt"].startswith("<|im_start|>user\n")


def test_a_checkpoint_follows_its_run_and_writes_beside_final(grpo_run, generate_spy):
    assert main([str(grpo_run / "checkpoint-1"), "--limit", "1"]) == 0
    results = json.loads((grpo_run / "eval" / "synthetic-arithmetic_test_checkpoint-1.json").read_text())
    assert results["system_prompt"] == TUTOR and generate_spy == [24]
    assert results["model_dir"] == str(grpo_run / "checkpoint-1")


def test_results_go_to_short_readable_paths(grpo_run):
    from rlt.evaluate import default_results_path
    from rlt.run_info import locate

    assert default_results_path(locate("rlt:tiny"), "../shared/data/gsm8k", "test") == \
        Path("results/eval/rlt-tiny__gsm8k_test.json")
    assert default_results_path(locate(str(grpo_run)), "synthetic:arithmetic", "test") == \
        grpo_run / "eval" / "synthetic-arithmetic_test.json"
    long = default_results_path(locate("Qwen/Qwen2.5-1.5B-Instruct"), "/a/b/c/d/e/f/g/gsm8k_style.jsonl", "test")
    assert long == Path("results/eval/Qwen2.5-1.5B-Instruct__gsm8k_style_test.json")


def _located(**config):
    from rlt.run_info import Located

    return Located(given="results/x", model_dir="results/x/final", run_dir=Path("results/x"), config=config)


def test_rlt_teacher_runs_lend_no_system_prompt():
    from rlt.evaluate import choose_prompt

    teacher = _located(algorithm="rlt", system_prompt="Teacher: explain the given solution.",
                       max_completion_length=48)
    chosen = choose_prompt(teacher)
    assert chosen.system_prompt is None and chosen.max_new_tokens == 48
    assert "RLT teacher" in chosen.notes[0]
    assert choose_prompt(teacher, system_prompt="@student").system_prompt.startswith("Your role as an assistant")
    sft = choose_prompt(_located(algorithm="sft", system_prompt="Be brief."))
    assert (sft.system_prompt, sft.max_new_tokens) == ("Be brief.", 256)  # SFT runs have no completion length


def test_choose_data_needs_gsm8k_format_data():
    from rlt.evaluate import choose_data
    from rlt.run_info import Located

    with pytest.raises(ConfigError, match="--data is required: rlt:tiny is not a run dir"):
        choose_data(Located(given="rlt:tiny", model_dir="rlt:tiny"))
    with pytest.raises(ConfigError, match="alpaca-format data"):
        choose_data(_located(dataset_id_or_path="tatsu-lab/alpaca", data_format="alpaca"))
    run = _located(dataset_id_or_path="data/math", data_format="gsm8k", data_columns={"question": "problem"},
                   eval_split=None, dataset_subset="main", synthetic={}, seed=7)
    chosen = choose_data(run)
    assert (chosen.data, chosen.split, chosen.data_columns, chosen.dataset_subset, chosen.seed) == \
        ("data/math", "test", {"question": "problem"}, "main", 7)
    other = choose_data(run, data="../shared/data/gsm8k")  # other data: read with the defaults, not the run's
    assert (other.data_columns, other.dataset_subset, other.seed, other.notes) == (None, None, 42, ())


def _eval_metrics():
    from rlt.evaluate import wandb_metrics

    return wandb_metrics({"data": "synthetic:arithmetic", "split": "test", "n": 3, "accuracy": 0.5,
                          "strict_accuracy": 0.25, "mean_completion_tokens": 20.0})


def test_results_resume_the_runs_wandb_run(tmp_path, monkeypatch):
    """wandb stood in for: the run's id resumed (allow), its project, the mode training would use, the run dir;
    one row with the step, the summary updated, the run ended; nothing without a wandb_id file or when disabled."""
    import types

    import rlt.tracking as tracking

    started = []

    class FakeRun:
        def __init__(self, **init):
            self.init, self.id, self.rows, self.summary, self.finished = init, init["id"], [], {}, False

        def log(self, row):
            self.rows.append(row)

        def finish(self):
            self.finished = True

    fake = types.SimpleNamespace(run=None, Settings=lambda **kw: kw,
                                 init=lambda **init: started.append(FakeRun(**init)) or started[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "is_available", lambda name: True)
    metrics = _eval_metrics()
    assert tracking.log_to_existing_run(tmp_path, metrics, config={}) is None and not started  # no wandb_id
    (tmp_path / "wandb_id").write_text("abc123\n")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.log_to_existing_run(tmp_path, metrics, config={"wandb_project": "p", "wandb_mode": None},
                                        step=7) == "abc123"
    (run,) = started
    assert {k: run.init[k] for k in ("project", "id", "resume", "dir", "mode")} == \
        {"project": "p", "id": "abc123", "resume": "allow", "dir": str(tmp_path), "mode": "offline"}
    assert run.rows == [{**metrics, "train/global_step": 7}] and run.summary == metrics and run.finished
    assert tracking.log_to_existing_run(tmp_path, metrics, config={"wandb_mode": "disabled"}) is None
    assert len(started) == 1


@pytest.mark.slow
def test_results_are_logged_into_the_runs_wandb_run(grpo_run, tmp_path, monkeypatch):
    """Offline, a real wandb run resumed by the id in <run>/wandb_id: the metrics are in its offline run file
    (marked slow: starting wandb's service takes 4 to 20 s here)."""
    pytest.importorskip("wandb")
    import shutil

    from rlt.tracking import log_to_existing_run

    run_dir = tmp_path / "run"
    shutil.copytree(grpo_run, run_dir, ignore=shutil.ignore_patterns("checkpoint-*", "final"))
    metrics = _eval_metrics()
    assert log_to_existing_run(run_dir, metrics, config={}) is None  # no wandb_id: the run did not use wandb
    (run_dir / "wandb_id").write_text("evaltest1\n")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert log_to_existing_run(run_dir, metrics, config={"wandb_mode": None}, step=1) == "evaltest1"
    (written,) = (run_dir / "wandb").glob("offline-run-*-evaltest1/run-evaltest1.wandb")
    assert b"eval/synthetic-arithmetic_test/accuracy" in written.read_bytes()
    assert log_to_existing_run(run_dir, metrics, config={"wandb_mode": "disabled"}) is None


def test_wandb_problems_only_warn(tmp_path, monkeypatch, caplog):
    import rlt.tracking as tracking

    (tmp_path / "wandb_id").write_text("evaltest2\n")
    monkeypatch.setattr(tracking, "is_available", lambda name: False)
    with caplog.at_level(logging.WARNING, logger="rlt.tracking"):
        assert tracking.log_to_existing_run(tmp_path, {"eval/x/accuracy": 1.0}, config={"wandb_mode": "offline"}) \
            is None
    assert "wandb package is not importable" in caplog.text


def test_cli_logs_a_runs_results_to_its_wandb_run(grpo_run, monkeypatch):
    import rlt.evaluate as evaluate_mod
    import rlt.tracking as tracking

    logged = []
    monkeypatch.setattr(tracking, "log_to_existing_run",
                        lambda run_dir, metrics, *, config, step: logged.append((run_dir, sorted(metrics), step)))
    monkeypatch.setattr(evaluate_mod, "_hf_backend", _stub_backend("#### 3"))
    assert main([str(grpo_run), "--limit", "2", "--output", str(grpo_run / "eval" / "stub.json")]) == 0
    assert logged == [(grpo_run, ["eval/synthetic-arithmetic_test/accuracy",
                                  "eval/synthetic-arithmetic_test/mean_completion_tokens",
                                  "eval/synthetic-arithmetic_test/n",
                                  "eval/synthetic-arithmetic_test/strict_accuracy"], 1)]
    (grpo_run / "eval" / "stub.json").unlink()


def _stub_backend(completion: str):
    def backend(model, torch_dtype, stack):
        class Tokenizer:
            def apply_chat_template(self, messages, tokenize, add_generation_prompt):
                return messages[-1]["content"]

            def batch_decode(self, rows, skip_special_tokens):
                return ["".join(map(chr, ids)) for ids in rows]

        return Tokenizer(), lambda texts, **kw: [[[ord(c) for c in completion]] for _ in texts]

    return backend


def test_cli_needs_one_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "synthetic:arithmetic"])
    assert exit_info.value.code == 2 and "the model to evaluate is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rlt:tiny", "--model", "other"])
    assert "two models given" in capsys.readouterr().err
