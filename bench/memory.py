"""Estimate vs measured memory of real training steps on CPU:  python bench/memory.py [--cases tiny,smollm2]

For each case, a fresh subprocess loads the model (fp32 or bf16), optionally wraps it with LoRA, and runs a plain
torch loop: `loss = model(ids, labels=ids).loss; loss.backward(); clip_grad_norm_; AdamW(fused).step();
zero_grad(set_to_none=True)`, with a fixed micro-batch of random token ids (no padding). The first step allocates the
optimizer states; the next steps run under `torch.profiler` with `profile_memory=True`, whose allocation/free events
give the exact peak of live bytes on the CPU allocator. Measured = parameter bytes (allocated before profiling) +
that peak. Estimated = `rlt.memory.estimate` of the same plan (CPU: fp32 or bf16, no mixed precision, LoRA dropout
masks as 4-byte noise), without the GPU framework overhead. Results: docs/memory.md ("Measured vs estimated").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import REPO, write_json

# name, model, dtype, peft, micro-batch, seq, grad accumulation, gradient checkpointing
CASES = {
    "tiny-full": ("rlt:tiny", "float32", False, 4, 128, 1, False),
    "tiny-full-ga2": ("rlt:tiny", "float32", False, 4, 128, 2, False),
    "tiny-lora": ("rlt:tiny", "float32", True, 4, 128, 1, False),
    "tiny-full-bf16": ("rlt:tiny", "bfloat16", False, 4, 128, 1, False),
    "tiny-wide-full": ("rlt:tiny-wide", "float32", False, 8, 256, 1, False),
    "tiny-wide-full-gc": ("rlt:tiny-wide", "float32", False, 8, 256, 1, True),
    "tiny-wide-lora": ("rlt:tiny-wide", "float32", True, 8, 256, 1, False),
    "smollm2-full": ("rlt:smollm2-135m", "float32", False, 2, 256, 1, False),
    "smollm2-full-gc": ("rlt:smollm2-135m", "float32", False, 2, 256, 1, True),
    "smollm2-lora": ("rlt:smollm2-135m", "float32", True, 2, 256, 1, False),
    "smollm2-lora-bf16": ("rlt:smollm2-135m", "bfloat16", True, 2, 256, 1, False),
}
LORA = dict(r=16, alpha=32, dropout=0.05, target_modules=["all-linear"])


def measure(model_name: str, dtype: str, peft: bool, batch: int, seq: int, ga: int, gc: bool, steps: int = 2) -> dict:
    """Run in THIS process: peak live CPU bytes of weights + grads + optimizer + activations over `steps` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from rlt.models import make_lora_config, resolve_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype=getattr(torch, dtype))
    model.config.use_cache = False
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft:
        from peft import get_peft_model

        if gc:
            model.enable_input_require_grads()
        model = get_peft_model(model, make_lora_config(**LORA))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (ga, batch, seq))

    def step():
        for micro in ids:
            out = model(input_ids=micro, labels=micro)
            (out.loss / ga).backward()
            del out
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocates the optimizer states (measured below as live bytes from the start)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"weights": weights, "optimizer": state, "step_peak": peak, "measured": weights + state + peak,
            "trainable": sum(p.numel() for p in params)}


def estimate(model_name: str, dtype: str, peft: bool, batch: int, seq: int, ga: int, gc: bool) -> dict:
    from rlt import memory as M
    from rlt.memcheck import resolve_arch

    arch, _ = resolve_arch(model_name)
    plan = M.MemoryPlan(policy=arch, weight_dtype=dtype, compute_dtype="fp32" if dtype == "float32" else "bf16",
                        use_peft=peft, lora_r=LORA["r"], lora_dropout=LORA["dropout"],
                        lora_target_modules=tuple(LORA["target_modules"]), micro_batch=batch, seq_len=seq,
                        grad_accum=ga, gradient_checkpointing=gc, attention_mask=False, framework_overhead=0,
                        dropout_mask_bytes=4, optimizer="adamw_torch_fused")
    est = M.estimate(plan)
    return {"estimate": est.total, "peak_phase": est.peak_phase, "trainable": est.trainable,
            "components": {c.name: c.bytes for c in est.components if c.bytes}}


def run_case(name: str) -> dict:
    """Measure in a fresh subprocess (so the allocator starts clean), estimate here."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from bench.memory import measure, CASES; "
            f"print('RESULT' + json.dumps(measure(*CASES[{name!r}])))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode or not lines:
        raise RuntimeError(f"case {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT"):])
    result.update(estimate(*CASES[name]))
    result["ratio"] = result["estimate"] / result["measured"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    rows = {}
    print("| case | model | dtype | mode | batch × seq | GA | GC | estimate MB | measured MB | est/meas |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        model, dtype, peft, batch, seq, ga, gc = CASES[name]
        r = rows[name] = run_case(name)
        print(f"| {name} | {model} | {dtype} | {'LoRA r16' if peft else 'full'} | {batch} × {seq} | {ga} | "
              f"{'on' if gc else 'off'} | {r['estimate'] / 1e6:.1f} | {r['measured'] / 1e6:.1f} | {r['ratio']:.3f} |",
              flush=True)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
