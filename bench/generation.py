"""Generation throughput on CPU: transformers `generate` vs an in-process vLLM engine, same model, same prompts.

    python bench/generation.py                      # rlt:tiny, rlt:tiny-wide, rlt:smollm2-135m; 32 prompts x 64 tokens
    python bench/generation.py --quick              # rlt:tiny only, 8 prompts x 16 tokens, 1 repeat (smoke test)
    python bench/generation.py --models rlt:tiny --num-prompts 32,128,512 --max-tokens 64,256   # a scaling grid
    python bench/generation.py --threads 1,2 --profile   # torch threads sweep + where the time goes
    python bench/generation.py --models results/bench_cache/sft-rlt-tiny-wide-gsm8k-250-1024/final \
        --prompts ../shared/data/gsm8k --stop-at-eos --max-tokens 512 --temperature 0.7
        # a model that ends its answers (bench/grpo_step.py --warm-up-steps builds it): lengths as sampled

What is compared, per model and per (prompts, tokens, threads) case:

* hf: `model.generate` on one left-padded batch of all prompts (the model loaded by `rlt.models.load_model`,
  float32, its default attention), sampling at temperature 1.0, top_p 1.0, top_k off, `min_new_tokens =
  max_new_tokens` so every sequence gets exactly `max_tokens` new tokens.
* vllm: `rlt.generation.vllm_colocate.build_llm` (the trainer's CPU engine settings: in-process, eager, float32,
  `kv_cache_memory_bytes`), one `llm.generate` call on all prompts as token ids with `SamplingParams(temperature=1.0,
  top_p=1.0, max_tokens=N, ignore_eos=True, detokenize=False)` (what rlt's colocated generator does: TRL reads
  token ids only).

Both backends of a model live in one process (one subprocess per model; the vLLM engine in-process, as the colocated
engine is in training) and use torch's intra-op thread pool (`--threads`; the in-process engine does not pin threads:
`VLLM_CPU_OMP_THREADS_BIND` only applies to vLLM's own worker processes). Model load and engine build are timed
separately and excluded from throughput; each backend is warmed up once; then `--repeats` rounds alternate the order
(hf, vllm / vllm, hf, ...) so drift from other load on the machine hits both. Throughput = generated tokens / wall
seconds of the call; the ratio vllm/hf is taken within each round, and the table shows medians with [min, max]. On a
machine shared with other jobs wall time is hit by preemption (and, with 2+ threads, by OpenMP threads waiting for a
descheduled sibling), so the ratio of tokens per second of this process's CPU time (user + sys) is shown too: it is
less sensitive to other load.

`--stop-at-eos` measures what a GRPO round does instead: each sequence ends at an eos (the tokenizer's and the model
generation config's, `stop_token_ids`) or at `max_tokens` (HF: those as `eos_token_id`, no `min_new_tokens`, a row's
tokens counted up to and including its first eos; vLLM: those as `stop_token_ids`, no `ignore_eos`). Both sample from
the same distribution but draw different numbers, so the two do different amounts of work per call: HF's batch runs
until its longest row ends, vLLM drops each row when it ends. Throughput is then valid (counted) tokens per second,
and the mean length and the number of rows that hit the limit are reported per backend.

`--profile` adds where the time goes: forward hooks on the decoder (HF's model; vLLM's model inside the engine)
sum the wall time spent in model forward passes, the rest of the call is per-step overhead (sampling, scheduling,
input preparation, detokenization, Python); also reported per decode step. Results: docs/benchmarks.md (section 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import REPO, machine_info, spread, use_offline_env, write_json

use_offline_env()

DEFAULT_MODELS = ["rlt:tiny", "rlt:tiny-wide", "rlt:smollm2-135m"]


def chat_prompt_ids(tokenizer, n: int, source: str = "synthetic") -> list[list[int]]:
    """`n` questions with the <reasoning>/<answer> system prompt, chat template applied: synthetic arithmetic, or
    the first `n` of GSM8K's test split (`source` = a hub id or a dir with test.jsonl)."""
    from rlt.data.formats import REASONING_SYSTEM_PROMPT, gsm8k_prompt
    from rlt.data.synthetic import arithmetic_problems

    if source == "synthetic":
        rows = arithmetic_problems(n, seed=1234, max_operand=99, max_terms=3)
    else:
        from rlt.data.loading import prepare_gsm8k_eval

        rows = prepare_gsm8k_eval(dataset_id_or_path=source, dataset_subset="main", split="test", max_samples=n)
    texts = [tokenizer.apply_chat_template(gsm8k_prompt(r["question"], REASONING_SYSTEM_PROMPT), tokenize=False,
                                           add_generation_prompt=True) for r in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


class ForwardTimer:
    """Sums wall time between a module's forward pre-hook and its forward hook (outermost calls only)."""

    def __init__(self):
        self.seconds, self.calls, self._start, self._handles = 0.0, 0, None, []

    def attach(self, module) -> None:
        self._handles.append(module.register_forward_pre_hook(self._pre))
        self._handles.append(module.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.calls += 1
            self._start = None

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """The tokens that end a sequence with `--stop-at-eos`, the same for both backends: the tokenizer's eos and the
    model's `generation_config.eos_token_id` (an int or a list; vLLM stops on both by default)."""
    ids = [tokenizer.eos_token_id, generation_config.eos_token_id]
    flat = [i for x in ids for i in (x if isinstance(x, list) else [x]) if i is not None]
    return list(dict.fromkeys(flat))


class HFBackend:
    name = "hf"

    def __init__(self, path: str, tokenizer, profile: bool, temperature: float = 1.0, stop_at_eos: bool = False):
        import torch

        from rlt.models import load_model

        start = time.perf_counter()
        self.model = load_model(path, torch_dtype="float32", tokenizer=tokenizer).eval()
        self.setup_seconds = time.perf_counter() - start
        self.tokenizer, self.torch = tokenizer, torch
        self.temperature, self.stop_at_eos = temperature, stop_at_eos
        self.eos_ids = stop_token_ids(tokenizer, self.model.generation_config)
        self.lengths: list[int] = []  # of the last call's sequences
        self.timer = ForwardTimer() if profile else None
        if self.timer:
            self.timer.attach(self.model)

    def run(self, prompt_ids: list[list[int]], max_tokens: int, seed: int) -> int:
        from transformers import GenerationConfig

        torch, tok = self.torch, self.tokenizer
        width = max(len(p) for p in prompt_ids)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        config = GenerationConfig(do_sample=True, temperature=self.temperature, top_p=1.0, top_k=0,
                                  max_new_tokens=max_tokens, min_new_tokens=0 if self.stop_at_eos else max_tokens,
                                  pad_token_id=pad, eos_token_id=self.eos_ids)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        new = out[:, width:].tolist()
        if self.stop_at_eos:  # up to and including the first eos (HF pads finished rows)
            self.lengths = [next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), len(row)) for row in new]
        else:
            assert all(len(row) == max_tokens for row in new), [len(row) for row in new]
            self.lengths = [max_tokens] * len(new)
        return sum(self.lengths)


class VLLMBackend:
    name = "vllm"

    def __init__(self, path: str, max_model_len: int, kv_cache_bytes: int, profile: bool, temperature: float = 1.0,
                 stop_at_eos: bool = False, eos_ids: list[int] | None = None):
        from rlt.generation.vllm_colocate import build_llm

        start = time.perf_counter()
        self.llm = build_llm(path, kv_cache_memory_bytes=kv_cache_bytes, max_model_len=max_model_len,
                             dtype="float32")
        self.setup_seconds = time.perf_counter() - start
        self.temperature, self.stop_at_eos, self.eos_ids = temperature, stop_at_eos, eos_ids
        self.lengths: list[int] = []
        self.timer = ForwardTimer() if profile else None
        if self.timer:
            self.llm.apply_model(self.timer.attach)  # in-process engine: the hooks run in this process

    def run(self, prompt_ids: list[list[int]], max_tokens: int, seed: int) -> int:
        from vllm import SamplingParams

        # detokenize=False as the trainer's ColocatedVLLMGeneration samples (TRL reads token ids only)
        stop = {"stop_token_ids": self.eos_ids} if self.stop_at_eos else {"ignore_eos": True}
        params = SamplingParams(temperature=self.temperature, top_p=1.0, max_tokens=max_tokens, detokenize=False,
                                **stop)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling_params=params,
                                    use_tqdm=False)
        self.lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert self.stop_at_eos or self.lengths == [max_tokens] * len(prompt_ids), self.lengths
        return sum(self.lengths)


def measure_case(backends: list, prompt_ids: list[list[int]], max_tokens: int, repeats: int, threads: int) -> dict:
    """Warm-up + `repeats` interleaved timed calls of every backend on the same prompts."""
    import torch

    torch.set_num_threads(threads)
    for b in backends:  # warm-up (first-call allocations, lazy inits)
        b.run(prompt_ids, max_tokens, seed=0)
    runs: dict[str, list[dict]] = {b.name: [] for b in backends}
    for r in range(repeats):
        order = backends if r % 2 == 0 else backends[::-1]
        for b in order:
            if b.timer:
                b.timer.reset()
            start, cpu_start = time.perf_counter(), time.process_time()
            tokens = b.run(prompt_ids, max_tokens, seed=r + 1)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            run = {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                   "tokens_per_cpu_s": tokens / cpu_seconds, "load_avg": os.getloadavg()[0],
                   "mean_length": tokens / len(prompt_ids),
                   "at_limit": sum(n >= max_tokens for n in b.lengths)}
            if b.timer:
                run.update(forward_seconds=b.timer.seconds, forward_calls=b.timer.calls,
                           overhead_ms_per_step=1e3 * (seconds - b.timer.seconds) / max(b.timer.calls, 1),
                           forward_ms_per_step=1e3 * b.timer.seconds / max(b.timer.calls, 1))
            runs[b.name].append(run)
    result = {"threads": threads, "num_prompts": len(prompt_ids), "max_tokens": max_tokens, "runs": runs}
    if "hf" in runs and "vllm" in runs:
        result["ratio_vllm_over_hf"] = [v["tokens_per_s"] / h["tokens_per_s"]
                                        for h, v in zip(runs["hf"], runs["vllm"], strict=True)]
        result["cpu_ratio_vllm_over_hf"] = [v["tokens_per_cpu_s"] / h["tokens_per_cpu_s"]
                                            for h, v in zip(runs["hf"], runs["vllm"], strict=True)]
    return result


def _label(model: str) -> str:
    """A model's name for the table: a long path shortened to its end (the JSON keeps the whole path)."""
    return model if len(model) <= 18 else "..." + model[-15:]


def print_table(results: list[dict], profile: bool, lengths: bool = False) -> None:
    head = (f"{'model':<18} {'prompts':>7} {'tokens':>6} {'thr':>3} {'hf tok/s':>22} {'vllm tok/s':>22} "
            f"{'vllm/hf wall':>20} {'vllm/hf CPU-time':>20}")
    if profile:
        head += f" {'hf fwd/ovh ms/step':>19} {'vllm fwd/ovh ms/step':>21}"
    if lengths:
        head += f" {'mean length hf/vllm':>20} {'at limit hf/vllm':>17}"
    print(head)
    print("-" * len(head))
    for res in results:
        for case in res["cases"]:
            runs = case["runs"]
            line = (f"{_label(res['model']):<18} {case['num_prompts']:>7} {case['max_tokens']:>6} "
                    f"{case['threads']:>3} "
                    f"{spread([r['tokens_per_s'] for r in runs.get('hf', [])]) if 'hf' in runs else '-':>22} "
                    f"{spread([r['tokens_per_s'] for r in runs.get('vllm', [])]) if 'vllm' in runs else '-':>22} "
                    f"{spread(case['ratio_vllm_over_hf']) + 'x' if 'ratio_vllm_over_hf' in case else '-':>20} "
                    f"{spread(case['cpu_ratio_vllm_over_hf']) + 'x' if 'cpu_ratio_vllm_over_hf' in case else '-':>20}")
            if profile:
                for name, width in (("hf", 19), ("vllm", 21)):
                    rs = runs.get(name, [])
                    cell = (f"{statistics.median(r['forward_ms_per_step'] for r in rs):.1f}/"
                            f"{statistics.median(r['overhead_ms_per_step'] for r in rs):.1f}") if rs else "-"
                    line += f" {cell:>{width}}"
            if lengths:
                mean = {n: statistics.mean(r["mean_length"] for r in rs) for n, rs in runs.items()}
                limit = {n: sum(r["at_limit"] for r in rs) for n, rs in runs.items()}
                line += (f" {mean.get('hf', float('nan')):>9.1f}/{mean.get('vllm', float('nan')):<10.1f}"
                         f" {limit.get('hf', 0):>8}/{limit.get('vllm', 0):<8}")
            print(line)
    print()
    print(f"{'model':<18} {'params':>8} {'hf load s':>10} {'vllm build s':>13}")
    for res in results:
        print(f"{_label(res['model']):<18} {res['params_m']:>7.1f}M {res.get('hf_load_seconds', float('nan')):>10.1f} "
              f"{res.get('vllm_build_seconds', float('nan')):>13.1f}")


def run_model(name: str, args) -> dict:
    """Every case of one model, in this process: load HF model and build the vLLM engine once, then measure."""
    from rlt.models import load_tokenizer, model_num_params, resolve_model_path

    path = resolve_model_path(name)
    tokenizer = load_tokenizer(path)
    all_ids = chat_prompt_ids(tokenizer, max(parse_ints(args.num_prompts)), args.prompts)
    max_len = max(len(i) for i in all_ids) + max(parse_ints(args.max_tokens)) + 8
    backends = []
    res: dict = {"model": name, "path": path, "cases": [], "params_m": float("nan"),
                 "prompt_tokens_mean": sum(map(len, all_ids)) / len(all_ids)}
    wanted = args.backends.split(",")
    if "hf" in wanted:
        hf = HFBackend(path, tokenizer, args.profile, args.temperature, args.stop_at_eos)
        backends.append(hf)
        res.update(hf_load_seconds=hf.setup_seconds, params_m=model_num_params(hf.model) / 1e6)
    if "vllm" in wanted:
        vl = VLLMBackend(path, max_len, args.kv_cache_bytes, args.profile, args.temperature, args.stop_at_eos,
                         hf.eos_ids if "hf" in wanted else None)
        backends.append(vl)
        res["vllm_build_seconds"] = vl.setup_seconds
    for threads in parse_ints(args.threads):
        for n in parse_ints(args.num_prompts):
            for max_tokens in parse_ints(args.max_tokens):
                case = measure_case(backends, all_ids[:n], max_tokens, args.repeats, threads)
                ratio = case.get("ratio_vllm_over_hf")
                print(f"# {name} prompts={n} tokens={max_tokens} threads={threads}: "
                      + ", ".join(f"{k} {statistics.median(r['tokens_per_s'] for r in v):.0f} tok/s"
                                  for k, v in case["runs"].items())
                      + (f", vllm/hf {statistics.median(ratio):.2f}x" if ratio else ""), flush=True)
                res["cases"].append(case)
    return res


def launch_model(name: str, args) -> dict:
    """Run `run_model` for one model in a fresh subprocess: an in-process vLLM engine owns process-wide state
    (torch.distributed groups, which a second engine in the same process cannot share with a dying first one)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker-model", name, "--worker-out", str(out),
               "--num-prompts", args.num_prompts, "--max-tokens", args.max_tokens, "--threads", args.threads,
               "--repeats", str(args.repeats), "--backends", args.backends,
               "--kv-cache-bytes", str(args.kv_cache_bytes), "--prompts", args.prompts,
               "--temperature", str(args.temperature)] + (["--profile"] if args.profile else []) \
            + (["--stop-at-eos"] if args.stop_at_eos else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        tail: list[str] = []
        for line in proc.stdout:
            if line.startswith("# "):
                print(line, end="", flush=True)
            tail = (tail + [line])[-40:]
        if proc.wait() != 0:
            raise SystemExit(f"{name}: the benchmark subprocess failed (exit status {proc.returncode}):\n"
                             + "".join(tail))
        return json.loads(out.read_text())


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated rlt: names or model dirs (default: "
                   f"{','.join(DEFAULT_MODELS)}; --quick: rlt:tiny)")
    p.add_argument("--num-prompts", default="32", help="comma-separated batch sizes (all prompts in one call)")
    p.add_argument("--max-tokens", default="64", help="comma-separated numbers of generated tokens per sequence")
    p.add_argument("--threads", default=str(os.cpu_count()), help="comma-separated torch thread counts")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per case (after one warm-up)")
    p.add_argument("--backends", default="hf,vllm")
    p.add_argument("--kv-cache-bytes", type=int, default=512 * 2**20, help="vLLM CPU KV cache")
    p.add_argument("--profile", action="store_true", help="also time model forward passes vs per-step overhead")
    p.add_argument("--prompts", default="synthetic",
                   help="synthetic (arithmetic questions) or GSM8K (a hub id or a dir with test.jsonl)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--stop-at-eos", action="store_true",
                   help="end sequences at eos (lengths as sampled) instead of exactly --max-tokens")
    p.add_argument("--quick", action="store_true", help="smoke test: rlt:tiny, 8 prompts x 16 tokens, 1 repeat")
    p.add_argument("--json", default=None, help="write all measurements to this JSON file")
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or "rlt:tiny"
        args.num_prompts, args.max_tokens, args.repeats = "8", "16", 1

    if args.worker_model:  # one model in this process (see launch_model)
        res = run_model(args.worker_model, args)
        Path(args.worker_out).write_text(json.dumps(res) + "\n")
        return 0

    info = machine_info()  # its torch_threads: torch's default here (each model runs in a subprocess)
    results = [launch_model(name, args) for name in (args.models or ",".join(DEFAULT_MODELS)).split(",")]
    info["load_avg_end"] = list(os.getloadavg())

    print()
    print(f"generation throughput, tokens/s: median [min, max] of {args.repeats} interleaved rounds; "
          f"{info['cpus']} CPUs ({info.get('cpu_model', '?')}); load avg at start "
          f"{info['load_avg_start'][0]:.2f}, at end {info['load_avg_end'][0]:.2f}")
    print_table(results, args.profile, args.stop_at_eos)
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
