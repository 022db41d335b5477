"""Export a trained model as a self-contained model directory that plain transformers, peft or vLLM load.

    python -m rlt.export results/tiny_grpo --output exports/tiny_grpo --merge-lora
    python -m rlt.export results/lora_run/checkpoint-50 --output exports/lora_adapter --dtype bfloat16

The export holds the weights (a LoRA run's adapter merged into its base with ``--merge-lora``, else the adapter with
``base_model_name_or_path`` naming the base as the run's config does), the tokenizer with its chat template, a
``generation_config.json`` with the run's sampling, a model card (README.md) and the run's config
(``rlt_config.yaml``). It is written into ``<output>.tmp-<pid>`` and renamed into place when complete. The run is
found with `rlt.run_info.locate`; docs/tools.md (Export) describes the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlt.cli import parse_cli
from rlt.errors import ConfigError, ModelError, RltError
from rlt.run_info import CONFIG_FILE, Located, locate

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
RUN_CONFIG_FILE = "rlt_config.yaml"
SUMMARY_FILE = "summary.json"
# config keys the model card lists as the run's hyper-parameters (those present and not None, in this order)
CARD_HYPERPARAMETERS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay", "max_steps", "num_train_epochs",
    "train_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing",
    "num_generations", "loss_type", "beta", "max_prompt_length", "max_completion_length", "temperature", "top_p",
    "top_k", "min_p", "repetition_penalty", "student_model", "use_peft", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "load_in_4bit", "torch_dtype", "seed",
)
# summary.json entries that are bookkeeping, not metrics
_NOT_METRICS = frozenset({"wall_time_s", "steps", "num_tokens", "best_checkpoint_step", "last_n", "global_step"})
_TOKENIZER_CONFIG_DROP = ("is_local", "local_files_only")  # where this machine loaded it from, not the tokenizer


@dataclass(frozen=True)
class Export:
    """What `export` wrote: the directory, its size, what its weights are and the base model's name."""

    output: Path
    size_bytes: int
    weights: str  # "merged LoRA", "LoRA adapter" or "full model"
    base_model: str | None
    dtype: str


# ------------------------------------------------------------------------------------------------ names and text


def builtin_name_of(path: str) -> str | None:
    """The ``rlt:`` name of a built-in model's cache directory (``<cache>/<name>-<hash>``), else None.

    >>> from rlt.models import cache_dir
    >>> builtin_name_of(str(cache_dir() / "tiny-162432fea0")), builtin_name_of("/data/tiny-162432fea0")
    ('rlt:tiny', None)
    """
    from rlt.models import cache_dir, known_model_names

    candidate = Path(path).expanduser()
    if candidate.parent.resolve() != cache_dir().resolve():
        return None
    key = candidate.name.rpartition("-")[0]
    return f"rlt:{key}" if f"rlt:{key}" in known_model_names() else None


def base_model_name(located: Located, recorded_base: str | None) -> str | None:
    """How the export names its base model: the run config's ``model_name_or_path`` (a hub id, an ``rlt:`` name or
    the path the run was given); without a run, a LoRA adapter's recorded base (a built-in's cache dir as its
    ``rlt:`` name), or the ``rlt:`` name / hub id given; None for a plain local model dir."""
    if located.has_run and located.base_model:
        return str(located.base_model)
    if recorded_base is not None:
        return builtin_name_of(recorded_base) or recorded_base
    return None if Path(located.model_dir).expanduser().exists() else located.given


def describe_base(name: str | None) -> str:
    """One phrase for the model card and the summary.

    >>> describe_base("rlt:tiny")
    "`rlt:tiny` (rlt's built-in model: `rlt.models.resolve_model_path('rlt:tiny')` builds it)"
    >>> describe_base("Qwen/Qwen2.5-0.5B-Instruct"), describe_base(None)
    ('`Qwen/Qwen2.5-0.5B-Instruct`', 'unknown (a plain model directory)')
    """
    if name is None:
        return "unknown (a plain model directory)"
    if name.startswith("rlt:"):
        return f"`{name}` (rlt's built-in model: `rlt.models.resolve_model_path({name!r})` builds it)"
    if Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return f"`{name}` (a local path, as the run's config gives it)"
    return f"`{name}`"


def human_size(num_bytes: int) -> str:
    """`num_bytes` in binary units.

    >>> human_size(512), human_size(3_400_000), human_size(15 * 2**30)
    ('512 B', '3.2 MiB', '15.0 GiB')
    """
    size, unit = float(num_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{num_bytes} B" if unit == "B" else f"{size:.1f} {unit}"


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of a run's summary.json that are results: its top-level metrics and its ``eval`` ones.

    >>> final_metrics({"train_loss": 0.5, "global_step": 2, "run_name": "x", "eval": {"eval_loss": 0.7}})
    {'train_loss': 0.5, 'eval_loss': 0.7}
    """
    pairs = [*summary.items(), *(summary.get("eval") or {}).items()]
    return {k: v for k, v in pairs if isinstance(v, int | float) and not isinstance(v, bool) and k not in _NOT_METRICS}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


# ------------------------------------------------------------------------------------------------ the model card


def model_card(located: Located, *, title: str, weights: str, dtype: str, base: str | None,
               summary: dict[str, Any] | None, generation: dict[str, Any]) -> str:
    """The README.md of an export: what it is, its base model, how it was trained (with a run), how to load it."""
    adapter = weights == "LoRA adapter"
    lines = ["---", f"library_name: {'peft' if adapter else 'transformers'}", "pipeline_tag: text-generation",
             "tags:", "- rlt", *([f"- {located.algorithm}"] if located.algorithm else []), "---", "", f"# {title}", ""]
    trained = f"trained with rlt ({located.algorithm})" if located.has_run else "exported with rlt"
    lines += [f"A causal language model {trained}. Weights: {weights} ({dtype}).", "", "## Model", "",
              f"- {'Base model' if located.has_run or adapter else 'Model'}: {describe_base(base)}",
              f"- Weights: {weights}, {dtype}", f"- Exported from: `{located.given}`"
              + (f" (its `{Path(located.model_dir).name}`)" if located.model_dir != located.given else "")]
    if adapter:
        lines.append("- The adapter's `base_model_name_or_path` names this base model; load it on that model.")
    lines.append("")
    if located.has_run:
        lines += _training_section(located, summary)
    lines += ["## Generation", "", "`generation_config.json` holds the defaults `generate` uses:", "",
              *[f"- {k}: {_value(v)}" for k, v in generation.items()], ""]
    lines += _usage_section(adapter, base, located.system_prompt)
    return "\n".join(lines) + "\n"


def _training_section(located: Located, summary: dict[str, Any] | None) -> list[str]:
    splits = ", ".join(f"{k.removesuffix('_split')} `{located.get(k)}`" for k in ("train_split", "eval_split")
                       if located.get(k))
    lines = ["## Training", "", f"- Algorithm: {located.algorithm}",
             f"- Data: `{located.get('dataset_id_or_path')}` (format {located.get('data_format')}"
             + (f"; splits: {splits}" if splits else "") + ")"]
    if located.system_prompt:
        lines.append(f"- System prompt: `{' '.join(located.system_prompt.split())}`")
    lines += ["", "| hyper-parameter | value |", "|---|---|"]
    keys = [k for k in CARD_HYPERPARAMETERS if located.get(k) is not None
            and (located.get("use_peft") or not k.startswith("lora_"))]
    lines += [f"| {k} | {_value(located.get(k))} |" for k in keys]
    lines += ["", "The run's whole config is `rlt_config.yaml`.", ""]
    if summary is None:
        return lines + ["The run wrote no summary.json (it stopped before finishing), so there are no final "
                        "metrics.", ""]
    metrics = final_metrics(summary)
    lines += ["## Final metrics", "", f"From the run's summary.json, at step {summary.get('global_step', '?')}"
              + (f" (this export is `{Path(located.model_dir).name}`)"
                 if Path(located.model_dir).name.startswith("checkpoint-") else "") + ".", ""]
    lines += ["| metric | value |", "|---|---|", *[f"| {k} | {_value(v)} |" for k, v in metrics.items()]]
    return lines + [""]


def _usage_section(adapter: bool, base: str | None, system_prompt: str | None) -> list[str]:
    load = ("from peft import AutoPeftModelForCausalLM\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(path)  # loads the base model, then the adapter"
            if adapter else "model = AutoModelForCausalLM.from_pretrained(path)")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": "What is 3 plus 4?"}]
    lines = ["## Usage", ""]
    if system_prompt:
        lines += ["The run trained with a system prompt; give the model the same one.", ""]
    lines += ["With transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "", 'path = "<this directory>"', "tokenizer = AutoTokenizer.from_pretrained(path)", load,
              f"messages = {json.dumps(messages)}",
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              "out = model.generate(**inputs)  # with the sampling of generation_config.json",
              "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", ""]
    if adapter:
        if base is not None and base.startswith("rlt:"):
            lines += [f"The base model `{base}` is rlt's built-in, which only rlt resolves: load this adapter with "
                      "`rlt.models.load_eval_model(path)` (it merges the adapter into the base), or export with "
                      "`--merge-lora` for a plain model.", ""]
        return lines + ["For vLLM, export with `--merge-lora` (a plain model), or serve the base model with "
                        "`--enable-lora --lora-modules name=<this directory>`.", ""]
    return lines + ["With vLLM:", "", "```python", "from vllm import LLM", "",
                    'llm = LLM(model="<this directory>")',
                    f"outputs = llm.chat({json.dumps(messages)}, llm.get_default_sampling_params())",
                    "print(outputs[0].outputs[0].text)", "```", ""]


# ------------------------------------------------------------------------------------------------ the parts


def read_summary(located: Located) -> dict[str, Any] | None:
    """The run's summary.json, None without one; a damaged one is a warning (the card then has no metrics)."""
    path = located.run_dir / SUMMARY_FILE if located.run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("%s does not parse (%s): the model card gets no final metrics", path, e)
        return None
    return summary if isinstance(summary, dict) else None


def recorded_adapter_base(adapter_dir: Path) -> str:
    """``base_model_name_or_path`` of a LoRA adapter dir. Raises `ModelError`."""
    from rlt.models import _adapter_base

    return _adapter_base(adapter_dir)


def loadable_base(recorded: str, named: str | None) -> str:
    """The base model to load an adapter onto: the adapter's recorded base when it is a local dir (training records
    the resolved path), else the name the run's config gives, else the recorded one."""
    return recorded if Path(recorded).expanduser().is_dir() or not named else named


def load_adapter_tokenizer(adapter_dir: Path, base: str):
    """A LoRA adapter's tokenizer: the adapter dir's own, else (saved without one) its base model's."""
    from rlt.models import load_tokenizer

    return load_tokenizer(str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base)


def merge_adapter(adapter_dir: Path, base: str, tokenizer, torch_dtype: str):
    """The base model with the adapter merged into its weights (peft ``merge_and_unload``), as
    `rlt.models.load_eval_model` builds it. Raises `ModelError`."""
    from peft import PeftModel

    from rlt.models import load_model

    try:
        model = load_model(base, torch_dtype=torch_dtype, tokenizer=tokenizer)
    except ModelError as e:
        raise ModelError(f"LoRA adapter {adapter_dir}: cannot load its base model {base!r}: {e}") from e
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - shape mismatch, damaged weights: the input's problem, one line
        raise ModelError(f"cannot apply the LoRA adapter {adapter_dir} to its base model {base!r}: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e


def write_adapter(adapter_dir: Path, out: Path, base_name: str, torch_dtype: str) -> str:
    """Copy the adapter (config with ``base_model_name_or_path = base_name``, weights as safetensors, cast to
    `torch_dtype` unless auto) into `out`; returns the weights' dtype."""
    import torch
    from peft.utils import load_peft_weights
    from safetensors.torch import save_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    try:
        weights = load_peft_weights(str(adapter_dir), device="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged weights file
        raise ModelError(f"cannot read the LoRA adapter weights in {adapter_dir}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from e
    if torch_dtype != "auto":
        target = getattr(torch, torch_dtype)
        weights = {k: v.to(target) if v.is_floating_point() else v for k, v in weights.items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    dtypes = {str(v.dtype).removeprefix("torch.") for v in weights.values() if v.is_floating_point()}
    return ", ".join(sorted(dtypes)) or "none"


def base_generation_config(base: str | None):
    """The base model's own generation config (its stop ids), or a default one when it cannot be read."""
    from transformers import GenerationConfig

    from rlt.models import resolve_model_path

    try:
        return GenerationConfig.from_pretrained(resolve_model_path(base)) if base else GenerationConfig()
    except Exception:  # noqa: BLE001 - no generation_config.json, no hub access: the tokenizer's ids are enough
        return GenerationConfig()


def generation_config(model_config, tokenizer, located: Located):
    """`model_config` (the model's generation config) with the tokenizer's eos (first; other stop ids kept) and pad
    ids and, for a run that sampled (GRPO / RLT), its sampling and ``max_new_tokens = max_completion_length``."""
    from transformers import GenerationConfig

    eos = model_config.eos_token_id if isinstance(model_config.eos_token_id, list) else [model_config.eos_token_id]
    eos = list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *eos] if i is not None))
    if located.sampling is None:
        config = GenerationConfig.from_dict(model_config.to_dict())
    else:  # the run's sampling replaces every sampling default of the base model
        config = GenerationConfig(bos_token_id=model_config.bos_token_id, **located.sampling.hf_kwargs())
    config.eos_token_id = eos[0] if len(eos) == 1 else (eos or None)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    if located.max_new_tokens is not None:
        config.max_new_tokens = located.max_new_tokens
    return config


def save_tokenizer(tokenizer, out: Path) -> None:
    """Save the tokenizer (with its chat template, ``chat_template.jinja``) for plain ``AutoTokenizer`` use, without
    the flags saying where this machine loaded it from."""
    tokenizer.save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in data.items() if k not in _TOKENIZER_CONFIG_DROP}, indent=2)
                        + "\n")


# ------------------------------------------------------------------------------------------------ the export


def check_output(output: Path, located: Located, force: bool) -> None:
    """Refuse an output that exists and is not empty (unless `force`) and one that holds the model or its run."""
    resolved = output.expanduser().resolve()
    for inside in (Path(located.model_dir), located.run_dir):
        if inside is not None and inside.expanduser().exists() and \
                (resolved == inside.expanduser().resolve() or resolved in inside.expanduser().resolve().parents):
            raise ConfigError(f"--output {output} would replace the model being exported ({inside}); choose another "
                              "directory")
    if output.is_file() or output.is_symlink() or (output.is_dir() and any(output.iterdir())):
        if not force:
            raise ConfigError(f"--output {output} already exists and is not empty; use --force to replace it")


def _place(tmp: Path, output: Path) -> None:
    """Rename the finished `tmp` to `output`, replacing what is there (`check_output` allowed it)."""
    old = None
    if output.is_dir() and not output.is_symlink():
        old = output.with_name(f"{output.name}.old-{os.getpid()}")
        os.replace(output, old)
    elif output.exists() or output.is_symlink():
        output.unlink()
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write(located: Located, out: Path, *, merge_lora: bool, torch_dtype: str) -> tuple[str, str | None, str]:
    """Everything but the card into `out`; returns ``(weights, base name, dtype)``."""
    from rlt.models import is_lora_adapter, load_eval_tokenizer, load_model

    model_dir = Path(located.model_dir).expanduser()
    adapter = is_lora_adapter(located.model_dir)
    recorded = recorded_adapter_base(model_dir) if adapter else None
    base = base_model_name(located, recorded)
    load_base = loadable_base(recorded, located.base_model) if adapter else None
    tokenizer = load_adapter_tokenizer(model_dir, load_base) if adapter else load_eval_tokenizer(located.model_dir)
    if adapter and not merge_lora:
        dtype = write_adapter(model_dir, out, base or recorded, torch_dtype)
        gen, weights = generation_config(base_generation_config(load_base), tokenizer, located), "LoRA adapter"
    else:
        if merge_lora and not adapter:
            logger.warning("--merge-lora: %s is not a LoRA adapter; exporting its full weights", located.model_dir)
        model = merge_adapter(model_dir, load_base, tokenizer, torch_dtype) if adapter else load_model(
            located.model_dir, torch_dtype=torch_dtype, tokenizer=tokenizer)
        model.save_pretrained(str(out))
        dtype = str(model.dtype).removeprefix("torch.")
        gen, weights = generation_config(model.generation_config, tokenizer, located), (
            "merged LoRA" if adapter else "full model")
    gen.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    if located.run_dir is not None:
        shutil.copyfile(located.run_dir / CONFIG_FILE, out / RUN_CONFIG_FILE)
    return weights, base, dtype


def export(source: str, output: str | Path, *, merge_lora: bool = False, torch_dtype: str = "auto",
           force: bool = False) -> Export:
    """Export the model `source` names (a run dir, its ``final/`` / ``checkpoint-N``, a model dir, hub id or ``rlt:``
    name) to `output`, written beside it as ``<output>.tmp-<pid>`` and renamed into place. Raises `RltError`
    subclasses for bad input (nothing is left behind)."""
    if torch_dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {torch_dtype!r}")
    located = locate(source)
    output = Path(output).expanduser()
    check_output(output, located, force)
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        weights, base, dtype = _write(located, tmp, merge_lora=merge_lora, torch_dtype=torch_dtype)
        generation = {k: v for k, v in json.loads((tmp / "generation_config.json").read_text()).items()
                      if k != "transformers_version"}
        title = located.get("run_name") or (located.run_dir.name if located.run_dir else output.name)
        card = model_card(located, title=title, weights=weights, dtype=dtype, base=base,
                          summary=read_summary(located), generation=generation)
        (tmp / "README.md").write_text(card)
        _place(tmp, output)
    except OSError as e:
        raise ConfigError(f"cannot export to {output}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    return Export(output=output, size_bytes=size, weights=weights, base_model=base, dtype=dtype)


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlt.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run dir (its final/, else its latest checkpoint-N), a final/ or checkpoint-N, or any "
                             "model dir / hub id / rlt: name")
    parser.add_argument("--output", "-o", required=True, help="the directory to write (must not exist or be empty)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge a LoRA adapter into its base model (without it, the adapter is exported)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="cast the saved weights (default auto: as stored)")
    parser.add_argument("--force", action="store_true", help="replace an existing, non-empty --output")
    return parser


def print_summary(result: Export, out=print) -> None:
    out(f"exported:   {result.output}  ({human_size(result.size_bytes)})")
    out(f"weights:    {result.weights}, {result.dtype}")
    base = result.base_model or "unknown (a plain model directory)"
    out(f"base model: {base}" + (" (rlt's built-in)" if base.startswith("rlt:") else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, with a one-line error on stderr)."""
    args = parse_cli(build_parser(), argv)
    try:
        result = export(args.model, args.output, merge_lora=args.merge_lora, torch_dtype=args.dtype,
                        force=args.force)
    except RltError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
