"""launch_multi.sh: argument errors, --dry-run commands (CPU and GPU modes), and process hygiene.

Process hygiene is checked with stand-in servers and trainers (PYTHON points at a wrapper that runs a small fake for
`-m rlt.generation.vllm_server` and the trainer launchers, and the real interpreter for the launcher's helpers,
`rlt.distributed`): each fake starts a grandchild, records every PID, and behaves as told (serve /health, exit 0,
exit 3, hang, die at start-up). After success, failure and SIGINT no recorded process may be alive. The real
servers and trainers are exercised by the slow tests in test_distributed.py.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "launch_multi.sh"


def run(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    full_env.pop("CUDA_VISIBLE_DEVICES", None)
    full_env.update(env or {})
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def commands(stdout: str, *, pinned: bool = False) -> list[list[str]]:
    """The dry run's command lines, split as the shell would (comments dropped, redirections kept as words); unless
    `pinned`, without the ``taskset -c CORES`` after ``setsid`` (CPU mode pins processes when there are enough cores:
    test_dry_run_cpu_mode_gives_servers_and_trainers_their_own_cores)."""
    out = []
    for line in stdout.splitlines():
        if line and not line.startswith("#"):
            words = shlex.split(line)
            if not pinned and "setsid" in words and words[words.index("setsid") + 1:][:1] == ["taskset"]:
                at = words.index("setsid") + 1
                del words[at:at + 3]
            out.append(words)
    return out


# ---------------------------------------------------------------- argument errors: exit 2, one clear line

@pytest.mark.parametrize("args,message", [
    ([], r"needs NUM_VLLM_GPUS NUM_TRAIN_GPUS RUN_CFG \(got 0 of them\)"),
    (["1", "2"], r"needs NUM_VLLM_GPUS NUM_TRAIN_GPUS RUN_CFG \(got 2 of them\)"),
    (["x", "2", "tiny_grpo"], r"NUM_VLLM_GPUS='x' must be a whole number >= 0"),
    (["1", "0", "tiny_grpo"], r"NUM_TRAIN_GPUS='0' must be a whole number >= 1"),
    (["1", "1", "nope"], r"no run config 'nope' in .*cfgs/run_cfg/ \(available: .*tiny_grpo"),
    (["0", "2", "tiny_grpo", "--zero", "4"], r"--zero 4: the ZeRO stage must be 1, 2 or 3"),
    (["0", "2", "tiny_grpo", "--zero"], r"--zero needs a stage"),
    (["0", "2", "tiny_grpo", "--offload"], r"--offload needs --zero 1, 2 or 3"),
    (["0", "2", "tiny_grpo", "--launcher", "mpirun"], r"--launcher mpirun: use accelerate or torchrun"),
    (["0", "2", "tiny_grpo", "--zero", "2", "--launcher", "torchrun"], r"--zero needs --launcher accelerate"),
    (["3", "1", "tiny_grpo", "--tp", "2"], r"NUM_VLLM_GPUS=3 is not a multiple of --tp 2"),
    (["2", "1", "tiny_grpo", "--tp", "2", "--cpu"], r"--tp 2 needs GPUs"),
    (["1", "1", "tiny_grpo", "--offlaod"], r"unknown option '--offlaod'"),
    (["1", "1", "tiny_grpo", "-m"], r"unknown option '-m'"),
])
def test_argument_errors_exit_2_with_one_line(args, message):
    r = run(*args, "--dry-run")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert re.search(message, r.stderr), r.stderr
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("launch_multi.sh: no GPU visible")]
    assert len(lines) == 1 and lines[0].startswith("launch_multi.sh: "), r.stderr
    assert r.stdout == ""


def test_help_exits_2_and_lists_the_options():
    r = run("--help")
    assert r.returncode == 2 and "--zero 1|2|3" in r.stderr and "--dry-run" in r.stderr


# ---------------------------------------------------------------- dry runs

def test_dry_run_cpu_one_server_two_trainers():
    r = run(1, 2, "cfgs/run_cfg/tiny_grpo.yaml", "max_steps=2", "--dry-run", "--log-dir", "/tmp/L")
    assert r.returncode == 0, r.stderr
    assert "no GPU visible" in r.stderr and "CPU mode" in r.stdout
    check, server, wait, train = commands(r.stdout)
    port = int(server[server.index("--port") + 1])
    url = f"http://127.0.0.1:{port}"
    assert check[1:5] == ["-m", "rlt.distributed", "check", "--world-size"] and check[5] == "2"
    assert check[-3:] == ["max_steps=2", "generation_backend=vllm_server", f"vllm_server_urls=[{url}]"]
    assert server[:3] == ["env", "CUDA_VISIBLE_DEVICES=", "setsid"]
    assert server[4:6] == ["-m", "rlt.generation.vllm_server"] and "--train-world-size" in server
    assert server[-7:] == ["tiny_grpo", "max_steps=2", "generation_backend=vllm_server", ">",
                           "/tmp/L/vllm_server_0.log", "2>&1", "&"]  # no URLs
    assert wait[1:4] == ["-m", "rlt.distributed", "wait"] and wait[6:9] == ["--server", url, "PID_OF_SERVER_0"]
    assert train[:3] == ["env", "CUDA_VISIBLE_DEVICES=", "setsid"]
    assert train[4:6] == ["-m", "accelerate.commands.launch"]
    assert train[train.index("--config_file") + 1] == str(REPO / "cfgs/accelerate/ddp.yaml")
    assert train[train.index("--num_processes") + 1] == "2"
    main_port = int(train[train.index("--main_process_port") + 1])
    assert main_port != port
    assert train[-4:] == ["run_cfg=tiny_grpo", "max_steps=2", "generation_backend=vllm_server",
                          f"vllm_server_urls=[{url}]"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPU cores")
def test_dry_run_cpu_mode_gives_servers_and_trainers_their_own_cores():
    """1 server + 1 trainer on 2 cores (the launcher itself restricted to cores of this machine): one core each; 1
    server + 2 trainers on 2 cores: no pinning, and a note saying so."""
    two = sorted(os.sched_getaffinity(0))[:2]
    limited = ["taskset", "-c", ",".join(map(str, two)), str(SCRIPT)]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"PYTHON": sys.executable}
    r = subprocess.run([*limited, "1", "1", "tiny_grpo", "--cpu", "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _, server, _, train = commands(r.stdout, pinned=True)
    assert server[3:6] == ["taskset", "-c", str(two[0])] and server[7:9] == ["-m", "rlt.generation.vllm_server"]
    assert train[3:6] == ["taskset", "-c", str(two[1])] and train[7:9] == ["-m", "rlt.train"]
    r = subprocess.run([*limited, "1", "2", "tiny_grpo", "--cpu", "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "taskset" not in r.stdout and "servers and trainers share the CPU cores" in r.stderr


def test_dry_run_no_server_keeps_the_runs_backend_and_single_process_runs_plain_python():
    r = run(0, 1, "tiny_grpo", "--cpu", "--dry-run")
    assert r.returncode == 0, r.stderr
    check, train = commands(r.stdout)
    assert "--servers" in check and check[check.index("--servers") + 1] == "0"
    assert train[3:] == [sys.executable, "-m", "rlt.train", "run_cfg=tiny_grpo"]  # no generation_backend override


@pytest.mark.parametrize("zero,offload,config", [("1", False, "zero1"), ("2", True, "zero2_offload"),
                                                 ("3", True, "zero3_offload"), ("3", False, "zero3")])
def test_dry_run_zero_picks_the_accelerate_config(zero, offload, config):
    r = run(2, 2, "tiny_grpo", "--cpu", "--zero", zero, *(["--offload"] if offload else []), "--dry-run")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 1 + 2 + 1 + 1  # check, 2 servers, wait, trainer
    train = cmds[-1]
    cfg = Path(train[train.index("--config_file") + 1])
    assert cfg == REPO / "cfgs" / "accelerate" / f"{config}.yaml" and cfg.is_file()
    ports = [int(c[c.index("--port") + 1]) for c in cmds[1:3]]
    assert len(set(ports)) == 2
    assert train[-1] == f"vllm_server_urls=[http://127.0.0.1:{ports[0]},http://127.0.0.1:{ports[1]}]"


def test_dry_run_torchrun_and_skip_memcheck():
    r = run(0, 2, "tiny_grpo", "--cpu", "--launcher=torchrun", "--skip-memcheck", "--dry-run")
    train = commands(r.stdout)[-1]
    assert train[4:6] == ["-m", "torch.distributed.run"] and train[train.index("--nproc_per_node") + 1] == "2"
    assert train[-1] == "memcheck=false"


@pytest.fixture
def fake_gpus(tmp_path):
    """A stand-in nvidia-smi with 8 GPUs of 81559 MiB on PATH (GPU mode without GPUs, for dry runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        case "$*" in
          *memory.total*) echo 81559 ;;
          *index*) for i in 0 1 2 3 4 5 6 7; do echo $i; done ;;
        esac
        """))
    smi.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_dry_run_gpu_mode_assigns_devices_and_checks_memory_with_zero(fake_gpus):
    r = run(4, 4, "teacher_rlt", "--zero", "3", "--offload", "--tp", "2", "--dry-run", env=fake_gpus)
    assert r.returncode == 0, r.stderr
    assert "GPU mode, 2 GPU(s) per server" in r.stdout
    memcheck, check, s0, s1, wait, train = commands(r.stdout)
    assert memcheck[1:4] == ["-m", "rlt.memcheck", "teacher_rlt"]
    assert " ".join(memcheck[4:]) == "generation_backend=vllm_server --num-gpus 4 --zero 3 --gpu-memory 81559MiB " \
                                     "--vllm-gpus 2 --offload --offload-params"
    assert s0[1] == "CUDA_VISIBLE_DEVICES=0,1" and s1[1] == "CUDA_VISIBLE_DEVICES=2,3"
    assert s0[s0.index("--tensor-parallel-size") + 1] == "2"
    assert train[1] == "CUDA_VISIBLE_DEVICES=4,5,6,7"
    assert "memcheck=false" in train  # the trainer's own check cannot see ZeRO; the launcher's did
    assert check[check.index("--world-size") + 1] == "4"


def test_dry_run_respects_an_existing_cuda_visible_devices(fake_gpus):
    r = run(1, 2, "tiny_grpo", "--dry-run", env={**fake_gpus, "CUDA_VISIBLE_DEVICES": "5,GPU-abc,7"})
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert cmds[1][1] == "CUDA_VISIBLE_DEVICES=5" and cmds[-1][1] == "CUDA_VISIBLE_DEVICES=GPU-abc,7"
    r = run(2, 2, "tiny_grpo", "--dry-run", env={**fake_gpus, "CUDA_VISIBLE_DEVICES": "5,6,7"})
    assert r.returncode == 2 and "needs 2 + 2 = 4 GPUs, 3 visible (5 6 7)" in r.stderr
    r = run(0, 1, "tiny_grpo", "--dry-run", env={**fake_gpus, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0 and "CPU mode" in r.stdout  # an empty list hides every GPU


# ---------------------------------------------------------------- process hygiene, with stand-ins

FAKE = r'''
import http.server, os, subprocess, sys, time
record = os.environ["FAKE_DIR"] + "/pids"
def note(role, pid):
    with open(record, "a") as f:
        f.write(f"{role} {pid}\n")
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
module = sys.argv[2]
role = "server" if module == "rlt.generation.vllm_server" else "trainer"
note(role, os.getpid()); note(role + "-grandchild", grandchild.pid)
if role == "server":
    if os.environ.get("FAKE_SERVER") == "die":
        print("engine build failed: not enough memory for the KV cache", flush=True)
        sys.exit(1)
    port = int(sys.argv[sys.argv.index("--port") + 1])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
mode = os.environ.get("FAKE_TRAINER", "ok")
if mode == "hang":
    open(os.environ["FAKE_DIR"] + "/trainer-started", "w").close()
    time.sleep(600)
sys.exit({"ok": 0, "fail": 3}[mode])
'''


@pytest.fixture
def stand_ins(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    wrapper = tmp_path / "python"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        case "${{2-}}" in
          rlt.generation.vllm_server|rlt.train|accelerate.commands.launch|torch.distributed.run)
            exec {sys.executable} {fake} "$@" ;;
          *) exec {sys.executable} "$@" ;;
        esac
        """))
    wrapper.chmod(0o755)
    return {"PYTHON": str(wrapper), "FAKE_DIR": str(tmp_path)}


def recorded(tmp_path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    path = tmp_path / "pids"
    for line in path.read_text().splitlines() if path.exists() else []:
        role, pid = line.split()
        out.setdefault(role, []).append(int(pid))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def launch(env, *args, tmp_path):
    full = {**os.environ, **env}
    full.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen([str(SCRIPT), "2", "2", "tiny_grpo", "--cpu", "--log-dir", str(tmp_path / "logs"), *args],
                            cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_nothing_left(tmp_path):
    pids = recorded(tmp_path)
    everything = [p for group in pids.values() for p in group]
    deadline = time.monotonic() + 5  # orphaned grandchildren are reaped by init, asynchronously
    while any(alive(p) for p in everything) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in everything if alive(p)], pids


@pytest.mark.parametrize("outcome,status", [("ok", 0), ("fail", 3)])
def test_no_process_left_after_success_or_failure_and_the_trainers_status_is_returned(stand_ins, tmp_path, outcome,
                                                                                      status):
    proc = launch({**stand_ins, "FAKE_TRAINER": outcome}, tmp_path=tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    pids = recorded(tmp_path)
    assert len(pids["server"]) == 2 and len(pids["trainer"]) == 1 and len(pids["server-grandchild"]) == 2
    assert f"trainer exited with status {status}" in stderr
    launched = (tmp_path / "logs" / "pids").read_text()
    assert all(str(p) in launched for p in pids["server"] + pids["trainer"])
    assert_nothing_left(tmp_path)


def test_no_process_left_after_sigint(stand_ins, tmp_path):
    proc = launch({**stand_ins, "FAKE_TRAINER": "hang"}, tmp_path=tmp_path)
    deadline = time.monotonic() + 90
    while not (tmp_path / "trainer-started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted: stopping what it started" in stderr
    assert_nothing_left(tmp_path)


def test_a_server_failing_at_start_up_stops_everything_before_training(stand_ins, tmp_path):
    proc = launch({**stand_ins, "FAKE_SERVER": "die"}, tmp_path=tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert re.search(r"vLLM server http://127.0.0.1:\d+ \(pid \d+\) exited while starting", stderr)
    assert "not enough memory for the KV cache" in stderr  # the end of its log
    assert "trainer" not in recorded(tmp_path)
    assert_nothing_left(tmp_path)


def test_check_rejects_a_missing_warm_up_checkpoint_before_any_server_starts(tmp_path, monkeypatch):
    """launch_multi.sh runs `rlt.distributed check` before it starts a server: a missing local model is one line."""
    from rlt.distributed import check
    from rlt.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # no results/teacher_sft/final here
    with pytest.raises(ConfigError, match=r"model_name_or_path=results/teacher_sft/final: there is no directory"):
        check(4, 4, "teacher_rlt", [])
