"""Multi-process training helpers: what `launch_multi.sh` asks Python, and what the trainers need under DeepSpeed.

    python -m rlt.distributed check --world-size 2 --servers 1 RUN_CFG [overrides...]   # before anything starts
    python -m rlt.distributed free-ports 3                                              # one free TCP port a line
    python -m rlt.distributed wait --world-size 2 --server URL PID LOG [--server ...] RUN_CFG [overrides...]

`check` validates the run config for the real number of training processes (and its generation servers) before
any server or weights load; `wait` polls the servers' /health; `ray` runs servers and training nodes as Ray actors
(`launch_multi.sh --ray`); `training_args_overrides()` lets DeepSpeed run without a GPU. Exit status: 0 ok; 1 a
server failed or timed out; 2 a usage or config error (one line on stderr). The launch, step by step:
docs/distributed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from pathlib import Path

from rlt.compose import compose, one_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or config: exit 2 with this one-line message."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_requested() -> bool:
    """True under `accelerate launch` with a DeepSpeed config (cfgs/accelerate/zero*.yaml)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def training_args_overrides() -> dict:
    """TrainingArguments fields the launch environment decides. DeepSpeed without a GPU: `use_cpu=False` (the
    recipes' default `use_cpu=True` makes accelerate ignore DeepSpeed) and `ddp_backend="gloo"` (without a named
    backend accelerate counts 1 process while DeepSpeed runs N, and DeepSpeed's batch-size check fails)."""
    import torch

    if deepspeed_requested() and not torch.cuda.is_available():
        return {"use_cpu": False, "ddp_backend": "gloo"}
    return {}


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cpu_sets(servers: int, trainers: int, cores: list[int] | None = None) -> list[list[int]]:
    """CPU mode: the cores of each server, then those the `trainers` training processes share, so that generation
    and training do not slow each other down (asynchronous generation runs them at the same time). Each process gets
    len(cores) // (servers + trainers) cores, the trainers the rest; [] when there are fewer cores than processes.
    `cores`: default, those this process may run on.

    Worked example: 1 server, 1 trainer, cores [0, 1] -> [[0], [1]]; 2 servers, 1 trainer, cores 0..7 -> 8 // 3 = 2
    each: [[0, 1], [2, 3], [4, 5, 6, 7]]; 1 server, 2 trainers, cores [0, 1] -> [].
    """
    cores = sorted(os.sched_getaffinity(0)) if cores is None else list(cores)
    share = len(cores) // (servers + trainers) if servers + trainers else 0
    if share == 0:
        return []
    return [cores[i * share:(i + 1) * share] for i in range(servers)] + [cores[servers * share:]]


def check(world: int, servers: int, run_cfg: str, overrides: list[str], *, cpu: bool | None = None) -> str:
    """Validate the run for `world` training processes and `servers` generation servers; a one-line summary.

    Then what the machine cannot honour (`rlt.preflight`, one line): `cpu` True (a CPU launch): this machine's
    packages, without CUDA. Otherwise (launch_multi.sh does not say, and its --ray training nodes need not be this
    machine) this machine as it is when it has a CUDA GPU; without one, whether the packages the keys need are
    installed (flash-attn, bitsandbytes, vLLM): each training process checks its own hardware at its start."""
    if world < 1:
        raise UsageError(f"NUM_TRAIN_GPUS={world} must be >= 1")
    run = compose(run_cfg, overrides, world_size=world)
    from dataclasses import replace

    from rlt.models import check_local_paths
    from rlt.preflight import Machine
    from rlt.preflight import check as preflight

    check_local_paths(run)
    machine = Machine.detect()
    if cpu:
        machine = machine.without_cuda()
    elif not machine.has_cuda:
        machine = replace(machine, has_cuda=None)  # no GPU here: not known where (or whether) the training has one
    preflight(run, machine, deepspeed=False, one_line=True)
    summary = f"config ok: run_cfg={run_cfg} algorithm={run.algorithm}, {world} training process(es)"
    summary += f", gradient_accumulation_steps={run.gradient_accumulation_steps}"
    generates = hasattr(run, "generation_backend")
    if servers and not generates:
        raise UsageError(f"{servers} vLLM server(s) requested, but run_cfg={run_cfg} trains "
                         f"algorithm={run.algorithm}, which generates nothing: use NUM_VLLM_GPUS=0")
    if generates:
        rnd = run.generation_round()
        summary += f", generation round {rnd} completions ({rnd // run.num_generations} prompts × " \
                   f"{run.num_generations}), generation_backend={run.generation_backend}"
        if servers and run.generation_backend != "vllm_server":
            raise UsageError(f"generation_backend={run.generation_backend} with {servers} vLLM server(s): the servers "
                             "would be unused")
    return summary


def wait_for_servers(servers: list[tuple[str, int, str]], timeout: float, poll_seconds: float = 1.0,
                     out=sys.stderr, alive=None, tail=None) -> None:
    """Wait until every (url, pid, log) server answers GET /health with 200; raise RuntimeError naming the server
    if its process exits first (with the end of its log) or after `timeout` seconds. `alive(pid)` and `tail(log)`
    default to this host's processes and files (the Ray launcher passes its own)."""
    alive = alive or _alive
    tail = tail or _tail
    import urllib.error
    import urllib.request

    start = time.monotonic()
    pending = list(servers)
    while pending:
        for server in list(pending):
            url, pid, log = server
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as response:
                    if response.status == 200:
                        pending.remove(server)
                        out.write(f"server {url} ready after {time.monotonic() - start:.0f}s\n")
                        continue
            if not alive(pid):
                raise RuntimeError(f"vLLM server {url} (pid {pid}) exited while starting; end of {log}:\n"
                                   + tail(log))
        if pending and time.monotonic() - start > timeout:
            names = ", ".join(f"{u} (log {log})" for u, _, log in pending)
            raise RuntimeError(f"vLLM server(s) {names} not ready after {timeout:g}s (vllm_server_timeout)")
        if pending:
            time.sleep(poll_seconds)


def _alive(pid: int) -> bool:
    try:
        waited, status = os.waitpid(pid, os.WNOHANG)  # only for our own children; else the next check
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent, the launcher) counts as dead
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _tail(path: str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"  (cannot read it: {e.strerror})"
    return "\n".join("  " + line for line in text[-lines:])


# ============================================================================ Ray: several nodes

def _kill_group(pgid: int, grace: float) -> None:
    """SIGTERM process group `pgid`, wait up to `grace` seconds, then SIGKILL what is left of it."""
    import signal

    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-pgid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def supervise(parent: int, cmd: list[str], grace: float = 10.0, record: str | None = None) -> int:
    """Run `cmd` in its own process group; stop that group when `parent` dies or when told to stop (SIGTERM/INT).

    The Ray launcher starts every server and training node through this, so that nothing outlives its Ray actor:
    not when the driver stops it, not when the driver, the actor or the whole Ray node dies."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, start_new_session=True)
    if record:
        with open(record, "a") as f:
            f.write(f"group {proc.pid} {socket.gethostname()}\n")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
    while proc.poll() is None and not stop and os.getppid() == parent:
        time.sleep(0.5)
    if proc.poll() is None:
        _kill_group(proc.pid, grace)
    else:  # the leader exited: stop what it may have left in its group (e.g. a rank torchrun did not reap)
        _kill_group(proc.pid, 1.0)
    return proc.wait() if proc.returncode is None else proc.returncode


class _NodeProcess:
    """A Ray actor running one process on its node (a vLLM server or one node's training launcher) under
    `supervise`. Wrapped with `ray.remote` at run time (this module does not import Ray)."""

    def __init__(self):
        self.proc = None
        self.log = None

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_ports(1, "0.0.0.0")[0]

    def start(self, cmd: list[str], env: dict[str, str], log: str | None, cwd: str, record: str) -> int:
        import subprocess

        wrapped = [sys.executable, "-m", "rlt.distributed", "supervise", "--parent", str(os.getpid()), "--record",
                   record, "--", *cmd]
        out = None
        if log:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            self.log = log
            out = open(log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(wrapped, cwd=cwd, env={**os.environ, **env}, stdout=out,
                                     stderr=subprocess.STDOUT if out else None)
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self) -> str:
        return _tail(self.log) if self.log else "  (no log)"

    def wait(self, timeout: float) -> int | None:
        import subprocess

        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the supervisor stops its group, then exits
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=20)
            if self.proc.poll() is None:
                self.proc.kill()


def _train_command(args, node_rank: int, master: str, port: int, server_overrides: list[str]) -> list[str]:
    per_node = args.num_train // args.nodes
    if args.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(args.nodes), "--node_rank",
               str(node_rank), "--nproc_per_node", str(per_node), "--master_addr", master, "--master_port", str(port)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config,
               "--num_processes", str(args.num_train), "--num_machines", str(args.nodes), "--machine_rank",
               str(node_rank), "--main_process_ip", master, "--main_process_port", str(port)]
    return [*cmd, "-m", "rlt.train", f"run_cfg={args.run_cfg}", *args.overrides, *server_overrides]


def ray_launch(args, out=sys.stderr) -> int:
    """Servers and training nodes as Ray actors in one placement group; returns the training status."""
    import signal

    from rlt.utils.imports import require

    require("ray")
    import ray

    if args.num_train % args.nodes:
        raise UsageError(f"NUM_TRAIN_GPUS={args.num_train} is not a multiple of --nodes {args.nodes}")
    run = compose(args.run_cfg, _server_side(args), world_size=args.num_train)
    bundles = _ray_bundles(args)
    if args.address == "local":  # a one-machine cluster started here (tests, trying it out)
        ray.init(num_cpus=len(bundles), num_gpus=0 if args.cpu else None, include_dashboard=False)
    else:
        ray.init(address=args.address, include_dashboard=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # after ray.init (it installs its own): run the finally
    cluster = _RayActors(args)
    try:
        cluster.place(bundles, args.strategy, args.placement_timeout)
        urls = _ray_start_servers(cluster, args, run.vllm_server_timeout, out)
        trainers = _ray_start_training(cluster, args, urls, out)
        return _ray_wait_for_training(trainers, out)
    finally:
        cluster.stop()
        ray.shutdown()


def _server_side(args) -> list[str]:
    """The run's overrides as the servers (and the launcher's checks) see them: with servers, the trainer's
    generation_backend=vllm_server too (keys such as async_generation are only valid with it)."""
    return [*args.overrides, "generation_backend=vllm_server"] if args.servers else list(args.overrides)


def _ray_gpus(args) -> tuple[int, int]:
    """GPUs of (one server, one training node); none with --cpu."""
    return (0, 0) if args.cpu else (args.tp, args.num_train // args.nodes)


def _ray_bundles(args) -> list[dict[str, int]]:
    """The placement group's bundles: one per server, then one per training node (resources of 0 left out)."""
    server_gpus, node_gpus = _ray_gpus(args)
    bundles = [{"CPU": 1, "GPU": server_gpus}] * args.servers + [{"CPU": 1, "GPU": node_gpus}] * args.nodes
    return [{k: v for k, v in b.items() if v} for b in bundles]


class _RayActors:
    """The placement group of a Ray launch and the `_NodeProcess` actors placed in it (actor i in bundle i); every
    process they start is recorded in LOG_DIR/pids."""

    def __init__(self, args):
        import ray

        self.record = Path(args.log_dir) / "pids"
        self.record.parent.mkdir(parents=True, exist_ok=True)
        self.env = {"CUDA_VISIBLE_DEVICES": ""} if args.cpu else {}
        if os.environ.get("RLT_SERVER_TOKEN"):  # a cluster started by `ray start` does not inherit our environment
            self.env["RLT_SERVER_TOKEN"] = os.environ["RLT_SERVER_TOKEN"]
        self.actor_cls = ray.remote(_NodeProcess)
        self.pg = None
        self.actors: list = []

    def place(self, bundles: list[dict[str, int]], strategy: str, timeout: float) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.pg = placement_group(bundles, strategy=strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
        if not ready:
            raise RuntimeError(f"Ray could not place {bundles} ({strategy}) within {timeout:g}s: "
                               f"cluster resources {ray.cluster_resources()}")

    def actor(self, index: int, gpus: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=index)
        a = self.actor_cls.options(num_cpus=1, num_gpus=gpus, max_concurrency=4, scheduling_strategy=strategy).remote()
        self.actors.append(a)
        return a

    def start(self, actor, cmd: list[str], log: str | None, where: str) -> int:
        """Start `cmd` under the actor's supervisor (`where`: "IP what", for the record); the supervisor's pid."""
        import ray

        pid = ray.get(actor.start.remote(cmd, self.env, log, os.getcwd(), str(self.record)))
        with open(self.record, "a") as f:
            f.write(f"supervisor {pid} {where}\n")
        return pid

    def stop(self) -> None:
        """Stop every actor's process (its supervisor stops the group), then free the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            ray.get([a.stop.remote() for a in self.actors], timeout=60)
        if self.pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.pg)


def _ray_start_servers(cluster: _RayActors, args, timeout: float, out) -> list[str]:
    """Start the vLLM servers (actors 0 .. servers-1) and wait until all answer /health; their URLs."""
    import ray

    server_gpus, _ = _ray_gpus(args)
    servers, waits = [], []
    for i in range(args.servers):
        a = cluster.actor(i, server_gpus)
        ip, port = ray.get([a.node_ip.remote(), a.free_port.remote()])
        log = str(Path(args.log_dir) / f"vllm_server_{i}.log")
        cmd = [sys.executable, "-m", "rlt.generation.vllm_server", "--host", "0.0.0.0", "--port", str(port),
               "--index", str(i), "--train-world-size", str(args.num_train), "--tensor-parallel-size",
               str(args.tp), args.run_cfg, *_server_side(args)]
        pid = cluster.start(a, cmd, log, f"{ip} server {i}")
        servers.append(a)
        waits.append((f"http://{ip}:{port}", pid, log))
        out.write(f"server {i}: {waits[-1][0]} (supervisor pid {pid} on {ip}), log {log}\n")
    by_pid = {pid: a for (_, pid, _), a in zip(waits, servers, strict=True)}
    by_log = {log: a for (_, _, log), a in zip(waits, servers, strict=True)}
    wait_for_servers(waits, timeout, out=out, alive=lambda pid: ray.get(by_pid[pid].poll.remote()) is None,
                     tail=lambda log: ray.get(by_log[log].tail.remote()))
    return [url for url, _, _ in waits]


def _ray_start_training(cluster: _RayActors, args, urls: list[str], out) -> list:
    """Start one training launcher per node (the actors after the servers'), told the servers' URLs; the actors."""
    import ray

    _, node_gpus = _ray_gpus(args)
    server_overrides = (["generation_backend=vllm_server", f"vllm_server_urls=[{','.join(urls)}]"]
                        if urls else [])
    trainers = [cluster.actor(args.servers + k, node_gpus) for k in range(args.nodes)]
    ips = ray.get([a.node_ip.remote() for a in trainers])
    master, port = ips[0], ray.get(trainers[0].free_port.remote())
    for k, a in enumerate(trainers):
        cmd = _train_command(args, k, master, port, server_overrides)
        cluster.start(a, cmd, None, f"{ips[k]} training node {k}")
        out.write(f"training node {k}: {' '.join(cmd)}\n")
    return trainers


def _ray_wait_for_training(trainers: list, out) -> int:
    """Wait for every training node; the first non-zero status stops the others and is returned (else 0)."""
    import ray

    status, running = 0, dict(enumerate(trainers))
    while running:  # short waits: signals reach this loop
        for k, a in list(running.items()):
            rc = ray.get(a.wait.remote(1.0 / len(running)))
            if rc is None:
                continue
            del running[k]
            if rc and not status:
                status = rc
                out.write(f"training node {k} exited with status {rc}: stopping the others\n")
                running = {}
                break  # (the others are stopped by the caller)
    return status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlt.distributed", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate the run for the launch topology")
    c.add_argument("--world-size", type=int, required=True, help="training processes")
    c.add_argument("--servers", type=int, default=0, help="vLLM generation servers")
    c.add_argument("--cpu", action="store_true", default=None, help="a CPU launch: check the CPU rules here")
    c.add_argument("run_cfg")
    c.add_argument("overrides", nargs="*")
    f = sub.add_parser("free-ports", help="print N free TCP ports, one a line")
    f.add_argument("count", type=int)
    f.add_argument("--host", default="127.0.0.1")
    cs = sub.add_parser("cpu-sets", help="CPU mode: the cores of each server, then the trainers', one a line "
                        "(comma-separated); nothing when there are fewer cores than processes")
    cs.add_argument("servers", type=int)
    cs.add_argument("trainers", type=int)
    w = sub.add_parser("wait", help="wait for the servers' /health (timeout: the run's vllm_server_timeout)")
    w.add_argument("--server", nargs=3, action="append", metavar=("URL", "PID", "LOG"), required=True)
    w.add_argument("--timeout", type=float, default=None, help="seconds (default: the run's vllm_server_timeout)")
    w.add_argument("--world-size", type=int, default=None, help="training processes (for the config check)")
    w.add_argument("run_cfg")
    w.add_argument("overrides", nargs="*")
    r = sub.add_parser("ray", help="servers and training nodes on a Ray cluster (launch_multi.sh --ray)")
    r.add_argument("--address", default="local", help="Ray address: auto (a running cluster), ray://..., or local")
    r.add_argument("--servers", type=int, default=0)
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--num-train", type=int, required=True, help="training processes in all")
    r.add_argument("--nodes", type=int, default=1, help="training nodes (torchrun/accelerate machines)")
    r.add_argument("--launcher", choices=("accelerate", "torchrun"), default="accelerate")
    r.add_argument("--accelerate-config", default=str(Path(__file__).resolve().parents[1] / "cfgs" / "accelerate"
                                                      / "ddp.yaml"))
    r.add_argument("--strategy", default="PACK", help="placement group strategy (PACK, SPREAD, STRICT_SPREAD)")
    r.add_argument("--placement-timeout", type=float, default=300.0)
    r.add_argument("--cpu", action="store_true")
    r.add_argument("--log-dir", required=True)
    r.add_argument("run_cfg")
    r.add_argument("overrides", nargs="*")
    sv = sub.add_parser("supervise", help="(internal) run a command, stop it when the parent dies")
    sv.add_argument("--parent", type=int, required=True)
    sv.add_argument("--record", default=None, help="append 'group PGID HOST' of the command to this file")
    sv.add_argument("cmd", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    from rlt.errors import RltError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "free-ports":
            if args.count < 1:
                raise UsageError("free-ports needs a count >= 1")
            print("\n".join(map(str, free_ports(args.count, args.host))))  # noqa: T201
        elif args.command == "cpu-sets":
            for cores in cpu_sets(args.servers, args.trainers):
                print(",".join(map(str, cores)))  # noqa: T201
        elif args.command == "check":
            print(check(args.world_size, args.servers, args.run_cfg, args.overrides, cpu=args.cpu))  # noqa: T201
        elif args.command == "supervise":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            return supervise(args.parent, cmd, record=args.record)
        elif args.command == "ray":
            try:
                return ray_launch(args)
            except RuntimeError as e:
                sys.stderr.write(f"launch_multi.sh: {e}\n")
                return EXIT_FAILED
        elif args.command == "wait":
            timeout = args.timeout
            if timeout is None:
                timeout = compose(args.run_cfg, args.overrides, world_size=args.world_size).vllm_server_timeout
            servers = [(url, int(pid), log) for url, pid, log in args.server]
            try:
                wait_for_servers(servers, timeout)
            except RuntimeError as e:
                sys.stderr.write(f"launch_multi.sh: {e}\n")
                return EXIT_FAILED
        return EXIT_OK
    except (UsageError, RltError) as e:
        sys.stderr.write(f"launch_multi.sh: {one_line(e)}\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
