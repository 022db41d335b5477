"""Distillation data from an RLT teacher (`rlt.distill`): explanation parsing and sample choice (hand-worked), the
run config a trained teacher brings, scoring through the run's reward, the whole RLT -> distill -> student SFT path
on the tiny models (hf and vllm), and the one-line errors of the CLI."""

import json

import pytest

from rlt.data.formats import to_sft_example
from rlt.data.teacher import (
    TeacherRow,
    get_teacher_format,
    student_answer,
    student_chat,
    student_messages,
    teacher_rl_prompt,
)
from rlt.distill import (
    Explanation,
    find_run_config,
    load_run_config,
    main,
    parse_explanation,
    pick_sample,
    teacher_model_dir,
)
from rlt.errors import ConfigError, DataError
from rlt.generation.sampling import Sampling
from rlt.train import run_training

STRATOS = get_teacher_format("stratos")


def test_parse_explanation_hand_worked():
    """The prompt ended with ``<|begin_of_explanation|>\\n\\n``: the explanation is that padding + the text up to
    the first close tag; what follows the tag is dropped."""
    assert parse_explanation("Add 2 and 2.\n\n<|end_of_explanation|><|im_end|>", STRATOS) == \
        Explanation("\n\nAdd 2 and 2.\n\n", True, False)
    assert parse_explanation("Add", STRATOS) == Explanation("\n\nAdd", False, False)  # stopped at the length limit
    assert parse_explanation("  <|end_of_explanation|> more", STRATOS) == Explanation("\n\n  ", True, True)
    assert parse_explanation("a<|end_of_explanation|>b<|end_of_explanation|>", STRATOS).text == "\n\na"
    r1 = get_teacher_format("r1")
    assert parse_explanation("x</explanation>", r1) == Explanation("\n\nx", True, False)


def test_pick_sample_hand_worked():
    closed, unclosed, blank = (Explanation("\n\nx", True, False), Explanation("\n\nx", False, False),
                               Explanation("\n\n", True, True))
    # sample 0 scores highest but never closed its explanation; sample 2 beats sample 1
    assert pick_sample([unclosed, closed, closed], [9.0, -2.0, -1.5]) == 2
    assert pick_sample([unclosed, closed, closed], [9.0, -2.0, -1.5], select="first") == 1
    assert pick_sample([unclosed, unclosed], [1.0, 2.0]) is None
    assert pick_sample([unclosed, unclosed], [1.0, 2.0], keep_unclosed=True) == 1
    assert pick_sample([blank, closed], [5.0, -3.0]) == 1  # a blank explanation is never kept
    assert pick_sample([blank], [5.0], keep_unclosed=True) is None
    assert pick_sample([closed, closed], [float("nan"), -4.0]) == 1  # a NaN reward loses to any finite one
    assert pick_sample([closed, closed], [None, None]) == 0  # unscored: the first
    assert pick_sample([closed, closed], [-1.0, -1.0]) == 0  # ties: the earliest


def test_student_answer_and_messages_are_the_chat_the_reward_scores(tiny_model_path):
    from rlt.models import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    assert student_answer("\n\nAdd.\n\n", "4", STRATOS) == (
        "<|begin_of_thought|>\n\nAdd.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n4\n\n<|end_of_solution|>")
    explanation = parse_explanation("Two plus two is four.\n\n<|end_of_explanation|>", STRATOS).text
    messages = student_messages("What is 2 + 2? ", explanation, " 4", STRATOS)
    # the SFT loader (data_format=messages) turns the row into prompt/completion; rendered, it is the student chat
    sft = to_sft_example({"messages": messages}, data_format="messages", columns={"messages": "messages"},
                         system_prompt=None)
    rendered = tok.apply_chat_template(sft["prompt"] + sft["completion"], tokenize=False)
    assert rendered == student_chat("What is 2 + 2? ", explanation, " 4", STRATOS, tok)


def test_run_config_of_a_trained_teacher(tmp_path, compose):
    run_dir = tmp_path / "teacher_run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "checkpoint-3").mkdir()
    assert find_run_config(str(tmp_path)) is None
    from rlt.config import to_yaml, validate

    (run_dir / "config.yaml").write_text(to_yaml(validate(compose(["run_cfg=teacher_rlt_tiny"]))))
    for teacher in (run_dir, run_dir / "final", run_dir / "checkpoint-3"):
        assert find_run_config(str(teacher)) == run_dir / "config.yaml"
    assert teacher_model_dir(str(run_dir)) == str(run_dir / "final")
    assert teacher_model_dir(str(run_dir / "checkpoint-3")) == str(run_dir / "checkpoint-3")
    run = load_run_config(str(run_dir / "final"), overrides=["temperature=0.9", "answer_log_prob_coeff=[2.0,0.0]"])
    assert run.temperature == 0.9 and run.answer_log_prob_coeff == [2.0, 0.0]
    assert run.teacher_data_format == "gsm8k"  # the run's data settings come along
    with pytest.raises(ConfigError, match="no_such_key"):
        load_run_config(str(run_dir / "final"), overrides=["no_such_key=1"])
    with pytest.raises(ConfigError, match="temperature"):
        load_run_config(str(run_dir / "final"), overrides=["temperature=-1"])
    with pytest.raises(ConfigError, match="no run config.*--run-cfg"):
        load_run_config(str(tmp_path))
    with pytest.raises(ConfigError, match="algorithm=sft"):
        load_run_config("rlt:tiny", run_cfg="tiny_sft")
    assert load_run_config("rlt:tiny", run_cfg="teacher_rlt_tiny", overrides=["max_completion_length=8"]) \
        .max_completion_length == 8


def test_the_reward_is_built_from_the_run_config(tiny_model_path):
    """distill builds the reward as the RLT recipe does, from the run config (`TeacherKLReward.from_run`): every
    reward key, the sampling temperature; a run scored by its reference model reuses no sampling log-probs."""
    from rlt.config import TeacherRewardSection
    from rlt.models import load_model, load_tokenizer
    from rlt.rewards.teacher import TeacherKLReward

    run = load_run_config("rlt:tiny", run_cfg="teacher_rlt_tiny",
                          overrides=["clip_kl=7.0", "not_matched_penalty=-2.0", "teacher_reward_batch_size=3",
                                     "use_reference_teacher_model=true", "kl_penalty_reward_coeff=[2.0,0.5]"])
    tok = load_tokenizer(tiny_model_path)
    reward = TeacherKLReward.from_run(run, student_model=load_model("rlt:tiny", tokenizer=tok), tokenizer=tok)
    assert reward.settings == TeacherRewardSection.of(run, teacher_reuse_sampling_logprobs=False)
    assert (reward.clip_kl, reward.not_matched_penalty, reward.kl_coeffs) == (7.0, -2.0, [2.0, 0.5])
    assert reward.scorer.batch_size == 3 and reward.teacher_temperature == run.temperature == 0.7
    assert reward.offload_untrained_models == run.offload_untrained_models


def test_scores_are_the_runs_teacher_reward(monkeypatch, compose, tiny_model_path):
    """Generation replaced by fixed completions: each sample's score equals the run's `TeacherKLReward` (its keys,
    its student: here tiny-wide, another model than the teacher) on the same ids, and the best closed sample is
    kept."""
    import rlt.distill as distill_mod
    from rlt.models import load_model, load_tokenizer
    from rlt.rewards.teacher import TeacherKLReward

    run = load_run_config("rlt:tiny", run_cfg="teacher_rlt_tiny",
                          overrides=["answer_log_prob_coeff=[1.0,0.5]", "kl_penalty_reward_coeff=[0.5,0.1]",
                                     "student_model=rlt:tiny-wide", "not_matched_penalty=-2.0"])
    tok = load_tokenizer(tiny_model_path)
    texts = ["one plus two<|end_of_explanation|>", "it is three", "three<|end_of_explanation|>"]
    fixed = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    monkeypatch.setattr(distill_mod, "_generate",
                        lambda *a, **k: distill_mod._Samples(tok, [list(fixed) for _ in a[2]], None, None))
    rows, summary = distill_mod.distill(teacher="rlt:tiny", run=run, limit=2, num_samples=3)
    assert summary["rows"] == 2 and summary["kept"] == 2 and summary["samples_closed"] == 4

    teacher, student = load_model("rlt:tiny", tokenizer=tok), load_model("rlt:tiny-wide", tokenizer=tok)
    keys = dict(answer_log_prob_coeff=[1.0, 0.5], kl_penalty_reward_coeff=[0.5, 0.1], not_matched_penalty=-2.0,
                reduction_log_prob_fn=run.reduction_log_prob_fn, reduction_kl_fn=run.reduction_kl_fn,
                unbias_student_log_probs_temp=run.unbias_student_log_probs_temp, clip_log_prob=run.clip_log_prob,
                clip_kl=run.clip_kl, normalize_log_prob_fn=None, normalize_kl_fn=None)
    reward = TeacherKLReward(student, tok, teacher, teacher_format=run.teacher_format, temperature=run.temperature,
                             **keys)
    as_own_student = TeacherKLReward(teacher, tok, teacher, teacher_format=run.teacher_format,
                                     temperature=run.temperature, **keys)
    for row in rows:
        rl = teacher_rl_prompt(TeacherRow(question=row["question"], solution=row["solution"], trace=None),
                               get_teacher_format(run.teacher_format), tok)
        expected = reward([rl["prompt"]] * 3, completion_ids=fixed, question=[row["question"]] * 3,
                          solution=[row["solution"]] * 3)
        wrong = as_own_student([rl["prompt"]] * 3, completion_ids=fixed, question=[row["question"]] * 3,
                               solution=[row["solution"]] * 3)
        assert abs(max(wrong[0], wrong[2]) - max(expected[0], expected[2])) > 1e-3  # the test tells students apart
        best = max((expected[0], 0), (expected[2], 2))
        assert row["teacher_reward"] == pytest.approx(best[0], abs=1e-5)
        assert row["reasoning_trace"] == ("one plus two" if best[1] == 0 else "three")
        assert row["samples"] == 3 and row["samples_closed"] == 2 and row["closed"]

    # a student chat over max_student_tokens is dropped and counted (SFT would truncate its solution)
    fmt = get_teacher_format(run.teacher_format)
    first = parse_explanation(texts[0], fmt).text
    lengths = [len(tok.apply_chat_template(student_messages(r["question"], first, r["solution"], fmt),
                                           tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    for limit, kept in ((max(lengths), 2), (min(lengths), 1 if min(lengths) < max(lengths) else 2)):
        _, summary = distill_mod.distill(teacher="rlt:tiny", run=run, limit=2, num_samples=3, score=False,
                                         select="first", max_student_tokens=limit)
        assert (summary["kept"], summary["dropped_too_long"]) == (kept, 2 - kept)
    with pytest.raises(DataError, match="none of the 2 rows was kept: 0 had no closed explanation in 3 sample"):
        distill_mod.distill(teacher="rlt:tiny", run=run, limit=2, num_samples=3, score=False, select="first",
                            max_student_tokens=10)


def test_scoring_reuses_the_teachers_sampling_logprobs():
    """Plain tempered sampling (the run's T = 0.7): the reward's teacher log-probs come from the generator (no
    teacher forward over the explanations), as in training. The same seed gives the same samples with reuse off and
    with a no-op filter (top_k over the whole vocabulary, which makes the log-probs "filtered": no reuse); their
    rewards, scored by the teacher forward, equal the reused ones within 1e-4."""
    import rlt.distill as distill_mod

    got = {}
    for name, extra in (("reuse", []), ("forward", ["teacher_reuse_sampling_logprobs=false"]),
                        ("filtered", ["top_k=100000"])):
        run = load_run_config("rlt:tiny", run_cfg="teacher_rlt_tiny", overrides=["max_completion_length=12", *extra])
        got[name] = distill_mod.distill(teacher="rlt:tiny", run=run, limit=3, num_samples=2, keep_unclosed=True)
    rows, summary = got["reuse"]
    assert summary["samples_reusing_sampling_logprobs"] == 6  # every sample has a non-blank explanation body here
    for other in ("forward", "filtered"):
        other_rows, other_summary = got[other]
        assert other_summary["samples_reusing_sampling_logprobs"] == 0
        assert [r["messages"] for r in other_rows] == [r["messages"] for r in rows]  # the same samples were kept
        assert [r["teacher_reward"] for r in other_rows] == pytest.approx([r["teacher_reward"] for r in rows],
                                                                          abs=1e-4)
        assert other_summary["mean_reward_all_samples"] == pytest.approx(summary["mean_reward_all_samples"], abs=1e-4)
    assert not distill_mod.reuses_sampling_logprobs(run, Sampling.from_run(run), "hf")  # the filtered run
    run = load_run_config("rlt:tiny", run_cfg="teacher_rlt_tiny", overrides=["torch_dtype=auto"])
    assert distill_mod.reuses_sampling_logprobs(run, Sampling(0.7), "hf")
    assert not distill_mod.reuses_sampling_logprobs(run, Sampling(0.7), "vllm")  # vLLM's own dtype choice


def test_a_reference_teacher_run_is_scored_with_its_initial_model(monkeypatch, tiny_model_path):
    """``use_reference_teacher_model``: training took q_k from the reference model (the run's initial model, here
    rlt:tiny), not from the policy; distillation scores the same way, whatever teacher samples (here rlt:tiny-wide)."""
    import rlt.distill as distill_mod
    from rlt.models import load_model, load_tokenizer
    from rlt.rewards.teacher import TeacherKLReward

    run = load_run_config("rlt:tiny-wide", run_cfg="teacher_rlt_tiny",
                          overrides=["use_reference_teacher_model=true", "student_model=rlt:tiny-wide"])
    assert run.model_name_or_path == "rlt:tiny"
    tok = load_tokenizer(tiny_model_path)
    fixed = [tok("one plus two<|end_of_explanation|>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    monkeypatch.setattr(distill_mod, "_generate",
                        lambda *a, **k: distill_mod._Samples(tok, [list(fixed) for _ in a[2]], None, None))
    rows, summary = distill_mod.distill(teacher="rlt:tiny-wide", run=run, limit=1)
    assert summary["samples_reusing_sampling_logprobs"] == 0

    student, initial = load_model("rlt:tiny-wide", tokenizer=tok), load_model("rlt:tiny", tokenizer=tok)
    keys = dict(settings=run, teacher_format=run.teacher_format, temperature=run.temperature)
    row = rows[0]
    call = dict(completion_ids=fixed, question=[row["question"]], solution=[row["solution"]])
    prompt = [teacher_rl_prompt(TeacherRow(question=row["question"], solution=row["solution"], trace=None),
                                get_teacher_format(run.teacher_format), tok)["prompt"]]
    expected = TeacherKLReward(student, tok, initial, **keys)(prompt, **call)[0]
    by_sampler = TeacherKLReward(student, tok, student, **keys)(prompt, **call)[0]
    assert abs(expected - by_sampler) > 1e-3  # the test tells the two teachers apart
    assert row["teacher_reward"] == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    """A 2-step RLT run of the tiny teacher (its run dir: config.yaml + final/)."""
    from hydra import compose, initialize_config_dir

    from rlt.config import register_defaults
    from tests.conftest import REPO

    register_defaults()
    out = tmp_path_factory.mktemp("teacher_rlt")
    with initialize_config_dir(config_dir=str(REPO / "cfgs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "run_cfg=teacher_rlt_tiny", "max_steps=2", "save_steps=2", "train_batch_size=8",
            "per_device_train_batch_size=4", "num_generations=4", "max_completion_length=16", f"output_dir={out}"])
    run_training(cfg)
    return out


def _distill_then_student(tmp_path, teacher_dir, capsys, *extra):
    output = tmp_path / "distilled.jsonl"
    status = main(["--teacher", str(teacher_dir / "final"), "--limit", "6", "--num-samples", "2",
                   "--keep-unclosed", "--output", str(output), *extra])
    assert status == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    summary = json.loads((tmp_path / "distilled.jsonl.summary.json").read_text())
    assert summary["kept"] == len(rows) == 6 and summary["num_samples"] == 2
    assert summary["max_new_tokens"] == 16  # the run's max_completion_length
    assert summary["samples_reusing_sampling_logprobs"] > 0  # the generator's log-probs replaced teacher forwards
    assert not (tmp_path / "distilled.jsonl.parts").exists()  # the finished chunks are gone once the output is written
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][2]["content"].startswith("<|begin_of_thought|>")
        assert row["messages"][2]["content"].endswith(f"\n\n{row['solution']}\n\n<|end_of_solution|>")
        assert isinstance(row["teacher_reward"], float)
    assert "kept 6 of 6 rows" in capsys.readouterr().out
    # the student trains on it with the shipped run config
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "cfgs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "run_cfg=student_sft_tiny", f"dataset_id_or_path={output}", "max_steps=2", "save_steps=2",
            "train_batch_size=4", "per_device_train_batch_size=4", f"output_dir={tmp_path / 'student'}"])
    summary = run_training(cfg)
    assert summary["global_step"] == 2
    # and is evaluated with the system prompt it was trained on
    from rlt.evaluate import main as evaluate_main

    results = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(tmp_path / "student" / "final"), "--data", "synthetic:arithmetic",
                          "--limit", "3", "--max-new-tokens", "8", "--system-prompt", f"@student:{output}",
                          "--output", str(results)]) == 0
    evaluated = json.loads(results.read_text())
    assert evaluated["n"] == 3 and evaluated["system_prompt"] == rows[0]["messages"][0]["content"]
    assert rows[0]["messages"][0]["content"] in evaluated["predictions"][0]["prompt"]
    return rows


def test_student_system_prompt_aliases(tmp_path):
    from rlt.evaluate import resolve_system_prompt

    assert resolve_system_prompt("@student") == STRATOS.student_system_prompt
    assert resolve_system_prompt("plain text") == "plain text" and resolve_system_prompt(None) is None
    distilled = tmp_path / "d.jsonl"
    distilled.write_text(json.dumps({"messages": student_messages("q", "\n\nx", "1", STRATOS)}) + "\n")
    assert resolve_system_prompt(f"@student:{distilled}") == STRATOS.student_system_prompt
    with pytest.raises(ConfigError, match="cannot read the system turn"):
        resolve_system_prompt(f"@student:{tmp_path / 'missing.jsonl'}")


def test_rlt_teacher_to_distilled_data_to_student_hf(tmp_path, trained_teacher, capsys):
    _distill_then_student(tmp_path, trained_teacher, capsys)


@pytest.mark.vllm
def test_rlt_teacher_to_distilled_data_vllm(tmp_path, trained_teacher, capsys):
    pytest.importorskip("vllm")
    _distill_then_student(tmp_path, trained_teacher, capsys, "--backend", "vllm", "--chunk-rows", "4",
                          "--kv-cache-memory-bytes", str(64 << 20))  # 2 chunks: an engine built, freed, rebuilt


def test_samples_are_drawn_with_the_runs_sampling_filters():
    """The teacher was trained sampling with its run's filters; distillation samples the same way. top_k=1 leaves
    only the argmax token, so both samples of a row are the same; without it temperature-1 samples differ."""
    from rlt.distill import _generate, load_run_config

    prompts = ["<|im_start|>user\nExplain 2 + 2.<|im_end|>\n<|im_start|>assistant\n<|begin_of_thought|>"]
    for top_k, same in ((1, True), (None, False)):
        run = load_run_config("rlt:tiny", run_cfg="teacher_rlt_tiny",
                              overrides=[f"top_k={'null' if top_k is None else top_k}", "temperature=1.0"])
        ids = _generate("rlt:tiny", run, prompts, backend="hf", num_samples=2, temperature=None,
                        max_new_tokens=12, batch_size=4, seed=0, kv_cache_memory_bytes=1 << 26).ids
        assert (ids[0][0] == ids[0][1]) is same


@pytest.mark.parametrize("args, message", [
    (["--teacher", "rlt:tiny"], "no run config"),
    (["--teacher", "results/no_such_run/final", "--run-cfg", "teacher_rlt_tiny"], "there is no directory"),
    (["--teacher", "rlt:tiny", "--run-cfg", "teacher_rlt_tiny", "--num-samples", "2", "--temperature", "0"],
     "needs temperature > 0"),
    (["--teacher", "rlt:tiny", "--run-cfg", "teacher_rlt_tiny", "--num-samples", "2", "--no-score"],
     "select=best among several samples needs the teacher reward"),
    (["--teacher", "rlt:tiny", "--run-cfg", "teacher_rlt_tiny", "nope=1"], "nope"),
    (["--teacher", "rlt:tiny", "--run-cfg", "teacher_rlt_tiny", "dataset_id_or_path=/nonexistent/x.jsonl"],
     "does not exist"),
    (["--teacher", "rlt:tiny", "--run-cfg", "no_such_run_cfg"], "no_such_run_cfg"),
])
def test_cli_errors_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "results").exists()  # nothing written (no chunk dir either)


def test_a_killed_distillation_resumes_after_its_last_finished_chunk(tmp_path, monkeypatch):
    """Chunks of 2 rows: killed in the third chunk, the rerun computes only that one and its output equals an
    uninterrupted run's (chunk c is sampled with seed + c); other settings in the same dir are refused."""
    import rlt.distill as distill_mod

    run = load_run_config("rlt:tiny", run_cfg="teacher_rlt_tiny", overrides=["max_completion_length=8"])
    options = dict(teacher="rlt:tiny", run=run, limit=6, num_samples=2, keep_unclosed=True, chunk_rows=2)
    import rlt.models

    load, loads = rlt.models.load_eval_model, []
    monkeypatch.setattr(rlt.models, "load_eval_model", lambda *a, **k: loads.append(a[0]) or load(*a, **k))
    whole, summary = distill_mod.distill(**options)
    assert summary["rows"] == 6 and [r["source_index"] for r in whole] == list(range(6))
    assert loads == ["rlt:tiny"] * 3  # HF: one teacher load per chunk, generating and scoring with it

    original, calls = distill_mod._distill_chunk, []

    def chunk(*args, **kwargs):
        calls.append(args[4])  # the chunk's first row
        if args[4] == 4 and len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third chunk
        return original(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "_distill_chunk", chunk)
    work = tmp_path / "out.jsonl.parts"
    with pytest.raises(KeyboardInterrupt):
        distill_mod.distill(**options, work_dir=work)
    assert sorted(p.name for p in work.glob("part-*.stats.json")) == ["part-00000.stats.json", "part-00001.stats.json"]
    resumed, resumed_summary = distill_mod.distill(**options, work_dir=work)
    assert calls == [0, 2, 4, 4]  # only the unfinished chunk ran again
    assert resumed == whole and resumed_summary == summary
    with pytest.raises(ConfigError, match="num_samples differ"):
        distill_mod.distill(**{**options, "num_samples": 3}, work_dir=work)
