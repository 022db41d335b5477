"""`python -m rlt.compare`: models side by side on the same problems, each asked as its run trained (or all alike
with --same-prompt); reference perplexity against a hand forward; md/json output; errors; the run report showing
eval/ and compare/ results."""

import json
import math
from pathlib import Path

import pytest

from rlt.compare import default_output_dir, main, perplexity, reference_nll

TUTOR = "You are a test tutor."
BRIEF = "Be brief."
PROBLEMS = [("Ann has 3 apples and buys 4 more. How many apples does she have?", "3 + 4 = <<3+4=7>>7\n#### 7"),
            ("A box holds 6 pens. How many pens are in 2 boxes?", "6 * 2 = <<6*2=12>>12 pens.\n#### 12"),
            ("Tom had 10 stamps and gave 3 away. How many are left?", "10 - 3 = <<10-3=7>>7\n#### 7"),
            ("A bus has 20 seats and 5 are empty. How many are taken?", "20 - 5 = <<20-5=15>>15 seats\n#### 15"),
            ("What is 9 plus 9?", "9 + 9 = 18\n#### 18"),
            ("What is 2 times 8?", "2 * 8 = 16\n#### 16")]


def _fake_run(path: Path, overrides: list[str], noise: float = 0.0) -> Path:
    """A run dir as training leaves it, without training: the validated config.yaml of `run_cfg=tiny_grpo` with
    `overrides`, and the tiny model (weights moved by `noise`, seeded) saved as its final/."""
    import torch

    from rlt.compose import compose_raw
    from rlt.config import to_yaml, validate
    from rlt.models import load_model, load_tokenizer, resolve_model_path

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(validate(compose_raw(["run_cfg=tiny_grpo", f"output_dir={path}",
                                                                     *overrides]))))
    tokenizer = load_tokenizer(resolve_model_path("rlt:tiny"))
    model = load_model(resolve_model_path("rlt:tiny"), tokenizer=tokenizer)
    if noise:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=generator))
    model.save_pretrained(path / "final")
    tokenizer.save_pretrained(path / "final")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two runs asked differently (run_a: TUTOR, 24 tokens; run_b: BRIEF, 16 tokens, other weights) and a 6-row
    GSM8K-format file."""
    root = tmp_path_factory.mktemp("compare")
    run_a = _fake_run(root / "run_a", [f"system_prompt={TUTOR}", "max_completion_length=24", "run_name=run_a"])
    run_b = _fake_run(root / "run_b", [f"system_prompt={BRIEF}", "max_completion_length=16", "run_name=run_b"],
                      noise=0.05)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PROBLEMS))
    return run_a, run_b, data


def _compare(out: Path, *args: str) -> dict:
    assert main([*args, "--output-dir", str(out)]) == 0
    return json.loads((out / "compare.json").read_text())


def test_plain_model_and_run_side_by_side(setup, tmp_path, capsys):
    run_a, _, data = setup
    results = _compare(tmp_path, "rlt:tiny", str(run_a), "--data", str(data), "--split", "train", "--limit", "4",
                       "--samples", "2")
    printed = capsys.readouterr().out
    assert [m["label"] for m in results["models"]] == ["rlt:tiny", "run_a/final"]
    assert results["n"] == 4 and [p["answer"] for p in results["problems"]] == ["7", "12", "7", "15"]
    assert results["problems"][0]["reference"] == PROBLEMS[0][1]
    for m in results["models"]:
        # the plain model is asked as the run in the list: the run's system prompt and completion length
        assert m["system_prompt"] == TUTOR and m["max_new_tokens"] == 24 and m["n"] == 4
        assert all(c["prompt"].startswith(f"<|im_start|>system\n{TUTOR}") for c in m["completions"])
        assert all(1 <= c["completion_tokens"] <= 24 for c in m["completions"])
        assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1 and m["reference_tokens"] > 0
        assert m["accuracy"] == sum(c["correct"] for c in m["completions"]) / 4
        assert printed.count(m["label"]) >= 3  # the table row and one line per sample
    assert "asked as run run_a/final" in results["models"][0]["from_run"][0]
    md = (tmp_path / "compare.md").read_text()
    assert "| model | system prompt | max new | accuracy | strict | mean tokens | ref ppl |" in md
    assert "| rlt:tiny |" in md and "| run_a/final |" in md
    assert md.count("### ") == 2 and PROBLEMS[1][0] in md
    assert "model" in printed and "ref ppl" in printed and str(tmp_path / "compare.md") in printed


def test_each_run_its_own_prompt_unless_same_prompt(setup, tmp_path):
    run_a, run_b, data = setup
    common = ["--data", str(data), "--split", "train", "--limit", "2", "--samples", "0"]
    own = _compare(tmp_path / "own", str(run_a), str(run_b), *common)
    a, b = own["models"]
    assert (a["system_prompt"], a["max_new_tokens"], b["system_prompt"], b["max_new_tokens"]) == (TUTOR, 24, BRIEF, 16)
    assert all(c["prompt"].startswith(f"<|im_start|>system\n{BRIEF}") for c in b["completions"])
    assert all(c["completion_tokens"] <= 16 for c in b["completions"])
    assert not own["same_prompt"]

    same = _compare(tmp_path / "same", str(run_a), str(run_b), *common, "--same-prompt")
    a, b = same["models"]
    assert [c["prompt"] for c in a["completions"]] == [c["prompt"] for c in b["completions"]]  # what was sent
    assert a["system_prompt"] == b["system_prompt"] == TUTOR and same["same_prompt"]
    assert b["max_new_tokens"] == 16  # the length still follows each run
    assert a["perplexity"] != b["perplexity"]  # other weights, same text: each model's own perplexity
    assert a["completions"] == own["models"][0]["completions"]  # run_a is asked as before


def test_reference_nll_matches_a_forward(tiny_model_path):
    """Batched, right-padded NLL of each reference == the obvious value: one forward of prompt + reference,
    -log_softmax at each reference token."""
    import torch

    from rlt.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    model = load_model(tiny_model_path, tokenizer=tokenizer)
    prompts = ["<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n", "Hi"]
    references = ["3 + 4 = 7\n#### 7", "a longer reference, so the first row is padded #### 1"]
    got = reference_nll(model, tokenizer, prompts, references, batch_size=2)
    for prompt, reference, (nll, tokens) in zip(prompts, references, got, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(reference, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1].float()
        expected = -torch.log_softmax(logits, -1).gather(1, torch.tensor(r)[:, None]).sum().item()
        assert tokens == len(r) and nll == pytest.approx(expected, rel=1e-4)
    mean, ppl = perplexity(got)
    assert mean == pytest.approx(sum(n for n, _ in got) / sum(t for _, t in got)) and ppl == pytest.approx(
        math.exp(mean))


def test_default_output_dir(setup):
    run_a, _, _ = setup
    assert default_output_dir([str(run_a), "rlt:tiny"]) == run_a / "compare"
    assert default_output_dir(["rlt:tiny", str(run_a / "final")]) == Path("results/compare/rlt-tiny_vs_run_a-final")


@pytest.mark.parametrize(("models", "message"), [
    (["rlt:tiny", "results/no_such_run/final"], "error: there is no directory results/no_such_run/final"),
    (["rlt:tiny"], "error: compare needs at least two models, got 1"),
])
def test_errors_are_one_line(setup, tmp_path, capsys, models, message):
    _, _, data = setup
    assert main([*models, "--data", str(data), "--split", "train", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_plain_models_need_data(capsys):
    assert main(["rlt:tiny", "rlt:tiny"]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_run_report_shows_eval_and_compare_results(tmp_path):
    from rlt.report import build_report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "compare").mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (run / "eval" / "gsm8k_test.json").write_text(json.dumps({
        "data": "../shared/data/gsm8k", "split": "test", "n": 200, "accuracy": 0.4125, "strict_accuracy": 0.25,
        "mean_completion_tokens": 180.5, "max_new_tokens": 256, "system_prompt": "x" * 300}))
    (run / "eval" / "broken.json").write_text("{not json")
    (run / "compare" / "compare.md").write_text("| model | accuracy |\n| <a> | 0.5 |\n")
    page = build_report([run]).html.read_text()
    assert "Evaluation (python -m rlt.evaluate, 1 in eval/)" in page and "gsm8k_test" in page
    assert "0.4125" in page and "180.5" in page and "x" * 77 + "..." in page and "x" * 78 not in page
    assert "Comparison (python -m rlt.compare" in page and "| &lt;a&gt; | 0.5 |" in page
