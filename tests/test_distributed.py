"""Multi-process training and vLLM generation servers (rlt.distributed, rlt.generation.vllm_server).

Fast tests (default suite): the launch-time config check, port and readiness helpers, the new config keys, and the
server client against stand-in HTTP servers (no vLLM). Slow tests (`pytest -m slow`, real processes on the CPU):
2 training processes vs 1 with the same global batch, DeepSpeed ZeRO-2/ZeRO-3 with offload, and a real vLLM-CPU
server with weight sync checked against the trainer's own greedy output, then killed under a running trainer.

What "the same loss" means across world sizes (documented in docs/distributed.md): the GRPO surrogate evaluated
on-policy (num_iterations=1, beta=0) is -mean(A) per micro-batch, and the advantages of a group sum to zero, so the
logged loss is ~0 in every configuration and comparing it proves nothing. What must agree is the gradient: with
identical completions the advantages are identical, and the global gradient (accumulated over 2 micro-batches in one
process, or all-reduced over 2 processes) is the same, so `grad_norm` of each step and the weights after each step
match. Identical completions come from the vLLM server backend: generation runs in one place whatever the number of
training processes, and each prompt is sampled with its own seed (run seed, round, index in the round).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlt import distributed
from rlt.config import validate
from rlt.errors import ConfigError
from rlt.generation import vllm_client as vcl
from rlt.generation import vllm_server as vs
from rlt.generation.shm import shm_dir
from rlt.rewards.teacher import TeacherKLReward

from .conftest import REPO

PY = sys.executable


def digit_reward(completions, **kwargs):
    """A reward that varies on the random tiny model's output (GSM8K rewards are all 0 there): digit fraction."""
    texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


class RankSkewedTeacherReward(TeacherKLReward):
    """The RLT teacher reward (teacher_rlt keys), scoring one sequence per forward on rank 1 and eight on rank 0: the
    ranks run different numbers of forwards, as different completions (lengths, blank rows, prefix groups) make them
    do in real runs."""

    def __init__(self, *args, **kwargs):
        kwargs["teacher_reward_batch_size"] = 1 if os.environ.get("RANK") == "1" else 8
        super().__init__(*args, **kwargs)


# ---------------------------------------------------------------- config keys and the launch-time check

def test_server_keys_validate_with_the_key_and_numbers(compose):
    run = validate(compose(["run_cfg=tiny_grpo", "vllm_server_urls=[http://127.0.0.1:8001,http://10.0.0.2:8002/]"]))
    assert vcl.server_urls(run.vllm_server_urls, run.vllm_server_host, run.vllm_server_port) == [
        "http://127.0.0.1:8001", "http://10.0.0.2:8002"]
    assert vcl.server_urls([], "host", 9) == ["http://host:9"]
    bad = {"vllm_server_urls=[localhost:8000]": r"vllm_server_urls\[0\]='localhost:8000' must look like http://HOST:PORT",
           "vllm_server_urls=[http://a:1,http://a:1]": r"lists a server twice",
           "vllm_server_urls=[http://a:70000]": r"vllm_server_urls\[0\]='http://a:70000'",
           "vllm_server_request_timeout=0": r"vllm_server_request_timeout=0.0 must be > 0",
           "vllm_server_timeout=-1": r"vllm_server_timeout=-1.0 must be > 0",
           "vllm_server_gpu_memory_utilization=1.5": r"vllm_server_gpu_memory_utilization=1.5 must be in \(0, 1\]",
           "vllm_server_port=0": r"vllm_server_port=0 must be in \[1, 65535\]"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            validate(compose(["run_cfg=tiny_grpo", override]))


def test_check_validates_the_geometry_for_the_real_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    line = distributed.check(2, 1, "tiny_grpo", ["generation_backend=vllm_server"])
    assert "2 training process(es), gradient_accumulation_steps=1" in line and "16 completions (4 prompts × 4)" in line
    assert "WORLD_SIZE" not in os.environ  # restored
    # tiny_grpo: train_batch_size 16, per-device 8: fine for 1 or 2 processes, impossible for 3
    with pytest.raises(ConfigError, match=r"train_batch_size=16 is not divisible by per_device_train_batch_size=8 × "
                                          r"world size 3 = 24"):
        distributed.check(3, 0, "tiny_grpo", [])
    with pytest.raises(ConfigError, match=r"generation_aggregation_steps=2 must divide gradient_accumulation_steps=1"):
        distributed.check(2, 0, "tiny_grpo", ["generation_aggregation_steps=2"])
    with pytest.raises(distributed.UsageError, match=r"algorithm=sft, which generates nothing: use NUM_VLLM_GPUS=0"):
        distributed.check(1, 2, "tiny_sft", [])
    with pytest.raises(distributed.UsageError, match=r"generation_backend=hf with 1 vLLM server\(s\)"):
        distributed.check(1, 1, "tiny_grpo", [])


def test_check_cli_prints_one_line_and_exits_2_on_a_bad_config():
    r = subprocess.run([PY, "-m", "rlt.distributed", "check", "--world-size", "3", "tiny_grpo"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "world size 3 = 24" in lines[0] and lines[0].startswith("launch_multi.sh: "), r.stderr


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = distributed.free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_training_args_overrides_turn_use_cpu_off_only_for_deepspeed(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert distributed.training_args_overrides() == {}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed.training_args_overrides() == {"use_cpu": False, "ddp_backend": "gloo"}  # no GPU here


def test_wait_reports_a_server_that_exits_while_starting(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("loading...\nRuntimeError: no memory for the KV cache\n")
    proc = subprocess.Popen([PY, "-c", "import sys; sys.exit(1)"])
    proc.wait()
    with pytest.raises(RuntimeError, match=r"(?s)exited while starting.*no memory for the KV cache"):
        distributed.wait_for_servers([("http://127.0.0.1:9", proc.pid, str(log))], timeout=30, poll_seconds=0.1)


def test_wait_times_out_naming_the_server(tmp_path):
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError, match=r"http://127.0.0.1:9 .* not ready after 0.5s"):
            distributed.wait_for_servers([("http://127.0.0.1:9", sleeper.pid, "log")], timeout=0.5, poll_seconds=0.1)
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- the client, against stand-in servers (no vLLM)

class _StandIn(http.server.ThreadingHTTPServer):
    """Answers like an rlt vLLM server: a completion is [first prompt token, seed % 1000, j] for sample j."""

    daemon_threads = True

    def __init__(self, *, delay: float = 0.0):
        self.requests: list[tuple[str, object]] = []
        self.delay = delay
        self.loaded: list = []
        self.version = 0
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        """A client that timed out (the slow stand-in) has closed its socket before the late reply: not an error.
        socketserver would print a traceback to stderr, seconds later, into whichever test is running then."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self._reply({"status": "ok"})
        return self._reply({"hostname": "elsewhere", "model_config": {"logprobs_mode": vs.LOGPROBS_MODE}})

    def do_POST(self):
        server: _StandIn = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(server.delay)
        if self.path == "/generate":
            req = json.loads(body)
            server.requests.append(("generate", req))
            completions = [[p[0], s % 1000, j] for p, s in zip(req["prompts"], req["seeds"], strict=True)
                           for j in range(req["n"])]
            return self._reply({"prompt_ids": req["prompts"], "completion_ids": completions,
                                "logprobs": [[[-0.5]] * 3 for _ in completions],
                                "logprob_token_ids": [[[t] for t in c] for c in completions],
                                "weights_version": server.version})
        if self.path.startswith("/update_weights"):
            from safetensors.torch import load, load_file

            if self.headers.get("Content-Type", "").startswith("application/json"):
                tensors = load_file(json.loads(body)["path"])
                server.requests.append(("update_weights", "path"))
            else:
                tensors = load(body)
                server.requests.append(("update_weights", "bytes"))
            server.loaded.append(tensors)
            query = self.path.partition("?")[2]
            server.version = int(json.loads(body)["version"] if not query else query.split("version=")[1])
            return self._reply({"num_tensors": len(tensors), "seconds": 0.0, "weights_version": server.version})
        server.requests.append((self.path, None))
        return self._reply({"success": True})


def test_split_evenly():
    assert vcl.split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert vcl.split_evenly(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert vcl.split_evenly(1, 3) == [(0, 1)]  # idle servers get no request


def test_generation_is_split_across_servers_in_order_and_does_not_depend_on_their_number():
    one, a, b = _StandIn(), _StandIn(), _StandIn()
    prompts = [[10], [11], [12], [13], [14]]
    single = vcl.VLLMServerClient([one.url], seed=7)
    double = vcl.VLLMServerClient([a.url, b.url], seed=7)
    out1 = single.generate(prompts, n=2, max_tokens=3)
    out2 = double.generate(prompts, n=2, max_tokens=3)
    assert out1 == out2  # same per-prompt seeds whatever the number of servers
    assert [c[0] for c in out2["completion_ids"]] == [10, 10, 11, 11, 12, 12, 13, 13, 14, 14]
    assert [len(r["prompts"]) for _, r in a.requests + b.requests] == [3, 2]  # contiguous halves, concurrently
    assert len(out2["logprobs"]) == 10
    again = single.generate(prompts, n=2, max_tokens=3)  # round 2: new seeds
    assert again["completion_ids"] != out1["completion_ids"]
    assert vcl.VLLMServerClient([one.url], seed=7).generate(prompts, n=2)["completion_ids"] == out1["completion_ids"]


def test_weights_go_through_shm_locally_and_in_the_body_to_other_hosts():
    import torch

    local, remote = _StandIn(), _StandIn()
    client = vcl.VLLMServerClient([local.url, remote.url], transport="shm")
    weights = [("a.weight", torch.arange(6.0).reshape(2, 3)), ("b.bias", torch.ones(2))]
    client.update_named_params(None, iter(weights))
    assert ("update_weights", "path") in local.requests and ("update_weights", "path") in remote.requests
    torch.testing.assert_close(local.loaded[0]["a.weight"], weights[0][1])
    assert not list(Path(shm_dir()).glob(f"rlt-weights-{os.getpid()}-*"))  # the file is removed afterwards
    auto = vcl.VLLMServerClient([remote.url])  # the stand-in reports another hostname: bytes in the request body
    auto.wait_until_ready()
    auto.update_named_params(None, iter(weights))
    assert remote.requests[-1] == ("update_weights", "bytes")
    torch.testing.assert_close(remote.loaded[-1]["b.bias"], torch.ones(2))
    auto.reset_prefix_cache()
    assert remote.requests[-1] == ("/reset_prefix_cache", None)


def test_a_deferred_weight_push_goes_out_with_the_next_generate_and_only_the_newest_copy():
    """Asynchronous generation: the trainer only copies its weights; the next generate (on the rollout thread) pushes
    them first, and the servers say which weights sampled (`weights_version`). Two copies before a generate: the
    servers get the newer one only, as version 3 (version 2 is never pushed)."""
    import torch

    server = _StandIn()
    client = vcl.VLLMServerClient([server.url], transport="shm")
    client.defer_weight_push = True
    client.update_named_params(None, iter([("w", torch.zeros(2))]))
    assert server.requests == [] and client.weights_version == 1
    assert client.generate([[5]], n=1)["weights_version"] == 1
    assert [kind for kind, _ in server.requests] == ["update_weights", "generate"]
    client.update_named_params(None, iter([("w", torch.ones(2))]))
    client.update_named_params(None, iter([("w", torch.full((2,), 2.0))]))
    out = client.generate([[5]], n=1)
    assert out["weights_version"] == 3 == server.version and len(server.loaded) == 2
    torch.testing.assert_close(server.loaded[-1]["w"], torch.full((2,), 2.0))
    assert client.generate([[5]], n=1)["weights_version"] == 3 and len(server.loaded) == 2  # nothing new to push


def test_cpu_sets_give_each_server_its_own_cores_and_the_trainers_the_rest():
    assert distributed.cpu_sets(1, 1, [0, 1]) == [[0], [1]]
    assert distributed.cpu_sets(2, 1, range(8)) == [[0, 1], [2, 3], [4, 5, 6, 7]]
    assert distributed.cpu_sets(1, 2, [0, 1]) == []


def test_a_dead_or_slow_server_stops_with_a_message_naming_it():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = vcl.VLLMServerClient([_StandIn().url, dead], resume_hint="Restart to resume from checkpoint-2.")
    with pytest.raises(vcl.VLLMServerError, match=rf"vLLM server {dead} failed during generate \(1 prompts × 2\): "
                                                  r"connection refused .*Training stops here. Restart to resume"):
        client.generate([[1], [2]], n=2)
    slow = vcl.VLLMServerClient([_StandIn(delay=2.0).url], request_timeout=0.3)
    with pytest.raises(vcl.VLLMServerError, match=r"no answer within 0.3s \(vllm_server_request_timeout\)"):
        slow.generate([[1]], n=1)
    waiting = vcl.VLLMServerClient([dead], connect_timeout=0.5)
    with pytest.raises(vcl.VLLMServerError, match=rf"{dead} not ready after 0.5s \(vllm_server_timeout\)"):
        waiting.wait_until_ready(poll_seconds=0.1)


def test_vllm_server_is_an_rlt_error_so_the_trainer_prints_one_line():
    from rlt.errors import RltError

    assert issubclass(vcl.VLLMServerError, RltError)


# ---------------------------------------------------------------- real processes (slow)

def _launch(*args, env=None, timeout=1200, log_dir=None) -> subprocess.CompletedProcess:
    cmd = [str(REPO / "launch_multi.sh"), *map(str, args)]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir)]
    full_env = {**os.environ, "PYTHON": PY, "WANDB_MODE": "disabled", "VLLM_LOGGING_LEVEL": "WARNING", **(env or {})}
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    r.seconds = time.monotonic() - start
    return r


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"grad_norm"' in line]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _process_groups_alive(pgids: set[int]) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in pgids:
            alive.append(int(stat.parent.name))
    return alive


def _launched_pgids(log_dir: Path) -> set[int]:
    """Process groups launch_multi.sh started ("server I PID ...", "trainer PID"), and with --ray the groups of the
    supervised commands ("group PGID HOST") and the supervisors ("supervisor PID ...", each in its actor's group)."""
    groups = set()
    for line in (log_dir / "pids").read_text().splitlines():
        kind, *fields = line.split()
        groups.add(int(fields[1] if kind == "server" else fields[0]))
    return groups


def _pids_alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(pid)
        except OSError:
            pass
    return out


def _nothing_left(log_dir: Path) -> list[int]:
    ids = _launched_pgids(log_dir)
    deadline = time.monotonic() + 10
    while (_process_groups_alive(ids) or _pids_alive(ids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _process_groups_alive(ids) + _pids_alive(ids)


COMMON = ["max_steps=2", "save_steps=1", "beta=0", "learning_rate=0.01", "report_to=[none]",
          "reward_funcs=[{_target_:tests.test_distributed.digit_reward}]", "reward_weights=null"]


@pytest.mark.slow
@pytest.mark.vllm
def test_two_training_processes_match_one_with_the_same_global_batch(tmp_path):
    """tiny_grpo: 16 completions per step (4 prompts × 4). 1 process: GA = 16 / 8 = 2; 2 processes (torchrun, gloo):
    GA = 1 each. Generation by one vLLM-CPU server in both runs."""
    pytest.importorskip("vllm")
    runs = {}
    for world in (1, 2):
        out, logs = tmp_path / f"world{world}", tmp_path / f"logs{world}"
        # SGD: Adam's first steps are ~lr·sign(g), which turns 1e-9 float differences of near-zero gradient entries
        # into lr-sized weight differences (seen: 0.02% of the weights off by up to 9e-4 at lr 0.01)
        r = _launch(1, world, "tiny_grpo", *COMMON, "optim=sgd", "learning_rate=0.5", f"output_dir={out}", "--cpu",
                    "--launcher", "torchrun", log_dir=logs)
        assert r.returncode == 0, r.stderr[-4000:]
        assert not _nothing_left(logs), "the launcher left processes behind"
        print(f"world {world}: {r.seconds:.0f}s")  # noqa: T201
        runs[world] = out
    m1, m2 = _metrics(runs[1]), _metrics(runs[2])
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2]
    for a, b in zip(m1, m2, strict=True):
        assert a["grad_norm"] > 0  # a real gradient, not the all-zero GSM8K reward of an untrained model
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        assert abs(a["loss"] - b["loss"]) < 1e-4  # ~0 on-policy in both (see the module docstring)
    w1, w2 = _weights(runs[1] / "final"), _weights(runs[2] / "final")
    initial = _weights(Path(__import__("rlt.models", fromlist=["x"]).resolve_model_path("rlt:tiny")))
    assert max((w1[k] - initial[k]).abs().max().item() for k in w1) > 1e-3  # training moved the weights
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["2", "3"])
def test_deepspeed_zero_with_offload_two_processes(tmp_path, zero):
    """ZeRO-2 (optimizer offload) and ZeRO-3 (parameter + optimizer offload), 2 CPU processes, hf generation. The
    first run compiles DeepSpeed's CPU ops (~2-3 min, cached in ~/.cache/torch_extensions)."""
    pytest.importorskip("deepspeed")
    out, logs = tmp_path / "out", tmp_path / "logs"
    r = _launch(0, 2, "tiny_grpo", *COMMON, f"output_dir={out}", "--cpu", "--zero", zero, "--offload", log_dir=logs)
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"ZeRO-{zero} offload: {r.seconds:.0f}s")  # noqa: T201
    assert f"zero{zero}_offload.yaml" in r.stderr
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert (out / "checkpoint-2" / ".rlt_complete").exists()
    final = _weights(out / "final")
    assert final and all(t.numel() > 0 for t in final.values())  # ZeRO-3: a gathered model, not empty shards
    assert not _nothing_left(logs)


@pytest.mark.slow
def test_rlt_reward_under_zero3_two_processes_with_different_forward_counts(tmp_path):
    """teacher_rlt_tiny under ZeRO-3 on 2 CPU processes: the student (the shared reference) and the teacher (the
    policy) are partitioned, and every forward gathers their weights collectively. Rank 1 scores one sequence per
    forward, rank 0 eight; without the forward-count agreement DeepSpeed stopped with "Detected a disagreement on
    list length between rank0 and rank1" (gloo; NCCL would hang). Then a longer run resumes from the checkpoint."""
    pytest.importorskip("deepspeed")
    out, logs = tmp_path / "out", tmp_path / "logs"
    r = _launch(0, 2, "teacher_rlt_tiny", "max_steps=2", "save_steps=1", "report_to=[none]", f"output_dir={out}",
                "reward_funcs=[{_target_:tests.test_distributed.RankSkewedTeacherReward}]", "--cpu", "--zero", "3",
                log_dir=logs)
    assert r.returncode == 0, r.stderr[-4000:]
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert not _nothing_left(logs)
    # a longer run in the same dir resumes from the ZeRO-3 checkpoint and trains only the missing step
    r = _launch(0, 2, "teacher_rlt_tiny", "max_steps=3", "save_steps=1", "report_to=[none]", f"output_dir={out}",
                "reward_funcs=[{_target_:tests.test_distributed.RankSkewedTeacherReward}]", "--cpu", "--zero", "3",
                log_dir=tmp_path / "logs2")
    assert r.returncode == 0, r.stderr[-4000:]
    log = r.stdout + r.stderr
    assert "resuming from" in log and "checkpoint-2" in log
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.vllm
def test_rlt_published_topology_on_cpu_server_and_zero3_trainers(tmp_path):
    """The published recipe's shape (teacher_rlt: vLLM servers + ZeRO-3 trainers) at CPU size: one vLLM-CPU server,
    2 ZeRO-3 training processes, teacher_rlt_tiny. The server's sampling log-probs stand in for the teacher forward
    on every row (the policy is the teacher); the student is the partitioned reference model."""
    pytest.importorskip("vllm")
    pytest.importorskip("deepspeed")
    out, logs = tmp_path / "out", tmp_path / "logs"
    r = _launch(1, 2, "teacher_rlt_tiny", "max_steps=2", "save_steps=1", "report_to=[none]", f"output_dir={out}",
                "--cpu", "--zero", "3", log_dir=logs)
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reused = [m["teacher_kl/reused_sampling_logprobs"] for m in records if "teacher_kl/reused_sampling_logprobs" in m]
    assert len(reused) == 2 and all(v == 1.0 for v in reused)
    assert (out / "checkpoint-2" / ".rlt_complete").exists()
    assert not _nothing_left(logs)


def _hf_greedy(model_dir, prompts, max_new_tokens=12):
    import torch

    from rlt.models import load_model

    model = load_model(str(model_dir), torch_dtype="float32")
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False)
            out.append(seq[0, len(ids):].tolist())
    return out


@pytest.mark.slow
@pytest.mark.vllm
def test_server_weight_sync_then_server_death_stops_the_trainer_cleanly(tmp_path):
    """A vLLM-CPU server process + a trainer process. After 2 steps the server holds the weights of step 1 (the
    sync before the 2nd generation; the 2nd update is never pushed): its greedy output equals HF greedy output of
    checkpoint-1. Then a longer run resumes, the server is killed mid-run, and the trainer stops with a message
    naming it, leaving its checkpoints complete."""
    pytest.importorskip("vllm")
    from rlt.models import load_tokenizer, resolve_model_path

    port = distributed.free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLLM_LOGGING_LEVEL": "WARNING", "WANDB_MODE": "disabled"}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen([PY, "-m", "rlt.generation.vllm_server", "--port", str(port), "tiny_grpo"], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.monotonic()
        distributed.wait_for_servers([(url, server.pid, str(tmp_path / "server.log"))], timeout=300)
        print(f"server ready in {time.monotonic() - start:.0f}s")  # noqa: T201
        out = tmp_path / "run"
        train = [PY, "-m", "rlt.train", "run_cfg=tiny_grpo", *COMMON, f"output_dir={out}",
                 "generation_backend=vllm_server", f"vllm_server_urls=[{url}]"]
        start = time.monotonic()
        r = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        print(f"2 steps with the server: {time.monotonic() - start:.0f}s")  # noqa: T201

        client = vcl.VLLMServerClient([url])
        client.wait_until_ready()
        assert client.get_server_info()["weights_version"] == 2  # synced before each of the 2 generation rounds
        tokenizer = load_tokenizer(str(out / "final"))
        prompts = [tokenizer(p)["input_ids"] for p in ["What is 3 plus 4?", "Tom has 5 apples.", "Compute 12 - 7"]]
        served = client.generate(prompts, n=1, max_tokens=12, temperature=0.0)["completion_ids"]
        assert served == _hf_greedy(out / "checkpoint-1", prompts)
        assert served != _hf_greedy(resolve_model_path("rlt:tiny"), prompts), "training did not change greedy output"

        # resume to 8 steps; kill the server once step 3 is checkpointed
        train_long = [*train, "max_steps=8"]
        trainer = subprocess.Popen(train_long, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 600
        while not (out / "checkpoint-3" / ".rlt_complete").exists():
            assert trainer.poll() is None, trainer.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        _, stderr = trainer.communicate(timeout=300)
        assert trainer.returncode == 2, stderr[-3000:]
        message = [line for line in stderr.splitlines() if line.startswith("rlt: vLLM server")]
        assert message and re.search(rf"rlt: vLLM server {url} failed during (generate|weight update).*connection "
                                     rf"refused.*Training stops here\. Restart the same command to resume", message[0])
        assert "Traceback" not in stderr
        from rlt.checkpoints import last_complete_checkpoint

        last = Path(last_complete_checkpoint(out))
        assert int(last.name.split("-")[1]) >= 3 and (last / "model.safetensors").exists()
        assert not (out / "final").exists() or (out / "final" / "model.safetensors").exists()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.vllm
def test_ray_local_cluster_one_server_two_training_nodes(tmp_path):
    """--ray local: a one-machine Ray cluster; 1 vLLM-CPU server actor and 2 training "nodes" (torchrun --nnodes 2,
    one process each) placed by a placement group; the trainers reach the server at the node's IP."""
    pytest.importorskip("ray")
    pytest.importorskip("vllm")
    out, logs = tmp_path / "out", tmp_path / "logs"
    r = _launch(1, 2, "tiny_grpo", *COMMON, f"output_dir={out}", "--cpu", "--ray", "local", "--nodes", "2",
                "--launcher", "torchrun", log_dir=logs)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    print(f"Ray local, 1 server + 2 nodes: {r.seconds:.0f}s")  # noqa: T201
    text = r.stdout + r.stderr
    assert re.search(r"server 0: http://[\d.]+:\d+ \(supervisor pid \d+", text)
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 1" in text
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["grad_norm"] > 0
    assert "sampling/importance_sampling_ratio/mean" in metrics[0]  # generated by the vLLM server
    records = (logs / "pids").read_text()
    assert records.count("group ") == 3 and records.count("supervisor ") == 3
    assert not _nothing_left(logs), records


@pytest.mark.slow
@pytest.mark.vllm
def test_ray_launch_interrupted_leaves_nothing_behind(tmp_path):
    """Ctrl-C while a Ray launch trains: the launcher exits 130 and no supervised process or group survives (the
    driver stops its actors; if Ray's own processes go first, each supervisor sees its actor die and stops its
    command's process group)."""
    pytest.importorskip("ray")
    pytest.importorskip("vllm")
    out, logs = tmp_path / "out", tmp_path / "logs"
    err = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115
    env = {**os.environ, "PYTHON": PY, "WANDB_MODE": "disabled", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([str(REPO / "launch_multi.sh"), "1", "2", "tiny_grpo", *COMMON, "max_steps=1000",
                             f"output_dir={out}", "--cpu", "--ray", "local", "--nodes", "2", "--launcher", "torchrun",
                             "--log-dir", str(logs)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.jsonl").exists() or '"grad_norm"' not in (out / "metrics.jsonl").read_text():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    records = (logs / "pids").read_text()
    assert records.count("group ") == 3, records
    assert not _nothing_left(logs), records
