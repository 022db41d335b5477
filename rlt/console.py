"""The training console: one line per logged step for every algorithm, health warnings that say what to change, and
third-party noise kept quiet (``verbose: true`` shows it).

    step 12/300 | reward 1.234 ± 0.456 | correctness 1.00, format 0.230 | zero-std 0.25 | kl 0.0123 | entropy 1.23
        | len 87 (clipped 0.12) | 2.30 s/step (gen 1.20, reward 0.30, train 0.80) | 410 tok/s | eta 11m02s
    step 12/300 | loss 1.234 | lr 3.0e-04 | grad 0.73 | 0.15 s/step | 3900 tok/s | eta 43s          (SFT)
    eval @ step 100 | loss 0.910 | ppl 2.48

`ConsoleLine` (a callback, in every recipe's callbacks) prints these on the main process and adds the step timings to
the logged record as ``timing/*`` (so metrics.jsonl and wandb get them); `quiet_trainer` removes transformers' own
printing of the metrics dict and its progress bar, and times generation and rewards; `configure_noise` sets the
third-party loggers and progress bars. Every logged number stays in metrics.jsonl.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable

from transformers import TrainerCallback

# (logs key, label) of the RLT teacher reward terms shown instead of the per-function reward means
TEACHER_TERMS = (("teacher_kl/log_prob_term", "log-prob term"), ("teacher_kl/kl_term", "kl term"),
                 ("teacher_kl/match_reward", "match"), ("teacher_kl/unclosed", "unclosed"))
ZERO_STD_LIMIT = 0.99  # frac_reward_zero_std at or above this: (almost) no group has a learning signal
CLIPPED_LIMIT = 0.5  # completions/clipped_ratio at or above this: most completions are cut


def _print(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - the console is the user-facing output


def num(v: float) -> str:
    """A metric value in about 3 significant digits: 1.0 -> '1.00', 0.0123 -> '0.0123', -7.107 -> '-7.11', 87.04 ->
    '87.0', 825.2 -> '825', 12345.6 -> '12346', 2e-05 -> '2.0e-05', nan -> 'nan'."""
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 99.95:
        return f"{v:.0f}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:#.3g}"


def seconds(v: float) -> str:
    """0.153 -> '0.15', 2.34 -> '2.3', 123.4 -> '123'."""
    return f"{v:.2f}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def duration(v: float) -> str:
    """42.4 -> '42s', 662 -> '11m02s', 7384 -> '2h03m'."""
    v = int(round(v))
    if v < 60:
        return f"{v}s"
    if v < 3600:
        return f"{v // 60}m{v % 60:02d}s"
    return f"{v // 3600}h{v % 3600 // 60:02d}m"


def _timing_parts(logs: dict, max_steps: int, step: int) -> list[str]:
    parts = []
    step_s = logs.get("timing/step_s")
    if step_s is not None:
        text = f"{seconds(step_s)} s/step"
        split = [(label, logs[key]) for key, label in (("timing/generation_s", "gen"), ("timing/reward_s", "reward"),
                                                       ("timing/train_s", "train")) if key in logs]
        if split:
            text += " (" + ", ".join(f"{label} {seconds(v)}" for label, v in split) + ")"
        parts.append(text)
    if logs.get("timing/tokens_per_s") is not None:
        parts.append(f"{logs['timing/tokens_per_s']:.0f} tok/s")
    if step_s is not None and 0 < step < max_steps:
        parts.append(f"eta {duration((max_steps - step) * step_s)}")
    return parts


def reward_parts(logs: dict, prefix: str = "") -> list[str]:
    """The reward fields of a GRPO/RLT record (`prefix` "eval_" for an eval record): reward ± its within-group std,
    the teacher reward terms (RLT) or each reward function's mean, frac_reward_zero_std."""
    parts = []
    if f"{prefix}reward" in logs:
        std = logs.get(f"{prefix}reward_std")
        parts.append(f"reward {logs[f'{prefix}reward']:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
    terms = [(label, logs[prefix + key]) for key, label in TEACHER_TERMS if prefix + key in logs]
    if not terms:
        head, tail = f"{prefix}rewards/", "/mean"
        terms = [(k[len(head):-len(tail)], v) for k, v in logs.items() if k.startswith(head) and k.endswith(tail)]
    if terms:
        parts.append(", ".join(f"{label} {num(v)}" for label, v in terms))
    if f"{prefix}frac_reward_zero_std" in logs:
        parts.append(f"zero-std {logs[f'{prefix}frac_reward_zero_std']:.2f}")
    return parts


def format_step(logs: dict, step: int, max_steps: int) -> str:
    """The console line of one logged training step (GRPO/RLT when the record has a reward, else SFT)."""
    parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
    if "reward" in logs:
        parts += reward_parts(logs)
        for key, label in (("kl", "kl"), ("entropy", "entropy")):
            if key in logs:
                parts.append(f"{label} {num(logs[key])}")
        if "completions/mean_length" in logs:
            text = f"len {logs['completions/mean_length']:.0f}"
            if "completions/clipped_ratio" in logs:
                text += f" (clipped {logs['completions/clipped_ratio']:.2f})"
            parts.append(text)
        if "async/staleness" in logs:  # asynchronous generation: optimizer steps between sampling and training
            parts.append(f"stale {round(logs['async/staleness'], 2):g}")
    else:
        if "loss" in logs:
            parts.append(f"loss {num(logs['loss'])}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.1e}")
        if "grad_norm" in logs:
            parts.append(f"grad {num(logs['grad_norm'])}")
    return " | ".join(parts + _timing_parts(logs, max_steps, step))


def format_eval(logs: dict, step: int) -> str:
    """The console line of an evaluation record (its keys prefixed ``eval_``)."""
    parts = [f"eval @ step {step}"]
    if "eval_loss" in logs:
        parts.append(f"loss {num(logs['eval_loss'])}")
    if "eval_perplexity" in logs:
        parts.append(f"ppl {num(logs['eval_perplexity'])}")
    if "eval_mean_token_accuracy" in logs:
        parts.append(f"token accuracy {logs['eval_mean_token_accuracy']:.3f}")
    parts += reward_parts(logs, "eval_")
    if "eval_completions/mean_length" in logs:
        parts.append(f"len {logs['eval_completions/mean_length']:.0f}")
    return " | ".join(parts)


def format_end(logs: dict, step: int) -> str:
    """The end-of-training record (train_runtime, train_loss, ...) as one line."""
    text = f"trained to step {step} in {duration(logs['train_runtime'])}"
    if "train_loss" in logs:
        text += f" (mean loss {num(logs['train_loss'])})"
    return text


def _finite(v) -> bool:
    return not isinstance(v, int | float) or math.isfinite(v)


class Health:
    """Warnings from the logged records, each once and then at most every `every` steps while it lasts: no learning
    signal (``frac_reward_zero_std`` >= 0.99 for `zero_std_steps` records in a row), most completions clipped
    (``completions/clipped_ratio`` >= 0.5), a non-finite loss, reward or grad_norm. `check` returns the messages."""

    def __init__(self, *, zero_std_steps: int = 3, every: int = 50):
        self.zero_std_steps, self.every = zero_std_steps, every
        self.zero_std_streak = 0
        self.last_warned: dict[str, int] = {}

    def _due(self, kind: str, step: int) -> bool:
        last = self.last_warned.get(kind)
        if last is not None and step - last < self.every:
            return False
        self.last_warned[kind] = step
        return True

    def check(self, logs: dict, step: int, args=None) -> list[str]:
        out = []
        bad = [k for k in ("loss", "reward", "grad_norm") if k in logs and not _finite(logs[k])]
        if bad and self._due("nonfinite", step):
            values = ", ".join(f"{k} {logs[k]}" for k in bad)
            lr = logs.get("learning_rate", getattr(args, "learning_rate", None))
            rewards = (", and check the reward functions (rewards/*/nonfinite in metrics.jsonl counts their NaN/inf "
                       "values)") if "reward" in logs else ""
            out.append(f"non-finite {values} at step {step}: lower learning_rate"
                       + (f" (now {lr:.1e})" if isinstance(lr, float) else "") + ", keep max_grad_norm > 0" + rewards)
        frac = logs.get("frac_reward_zero_std")
        self.zero_std_streak = self.zero_std_streak + 1 if frac is not None and frac >= ZERO_STD_LIMIT else 0
        if self.zero_std_streak >= self.zero_std_steps and self._due("zero_std", step):
            generations = getattr(args, "num_generations", None)
            group = f"{generations} completions" if generations else "completions"
            reward = logs.get("reward")
            if reward is not None and reward == 0:
                hint = "the reward is always 0: use an easier task, an SFT warm-up, or a reward with partial credit"
            else:
                hint = "use a harder task if the reward is always at its maximum, an easier one if always minimal"
            out.append(f"no learning signal for {self.zero_std_streak} logged steps in a row: in "
                       f"{frac:.0%} of the groups every one of the {group} got the same reward "
                       "(frac_reward_zero_std), so their advantages are 0. Raise num_generations or temperature; "
                       + hint)
        clipped = logs.get("completions/clipped_ratio")
        if clipped is not None and clipped >= CLIPPED_LIMIT and self._due("clipped", step):
            limit = getattr(args, "max_completion_length", None)
            at = f"max_completion_length={limit}" if limit else "max_completion_length"
            out.append(f"{clipped:.0%} of the completions were cut at {at} before they ended "
                       "(completions/clipped_ratio): raise max_completion_length, or set "
                       "mask_truncated_completions=true to leave cut completions out of the loss")
        return out


class ConsoleLine(TrainerCallback):
    """One line per logged record (step, eval, end of training) on the main process, and the `Health` warnings as
    ``rlt: warning: ...`` lines. It also adds the step's timings to every training record, on every process:
    ``timing/step_s`` (mean seconds from a step's start to its optimizer step, over the steps since the last
    record; checkpoint saves and evaluations are not in it), ``timing/tokens_per_s`` (TRL's ``num_tokens``, prompt and
    completion tokens, over that time) and, once `quiet_trainer` timed the trainer's generation and rewards,
    ``timing/generation_s``, ``timing/reward_s`` and ``timing/train_s`` (the rest of the step: log-prob forwards,
    loss, backward, optimizer) per step. Callbacks share the logged dict: this one runs first (`quiet_trainer`) so
    that metrics.jsonl, wandb and ``state.log_history`` get the timings."""

    def __init__(self, *, zero_std_steps: int = 3, warn_every: int = 50, write: Callable[[str], None] = _print):
        self.health = Health(zero_std_steps=zero_std_steps, every=warn_every)
        self.write = write
        self.times_blocks = False  # set by `quiet_trainer`: generation and reward seconds are recorded
        self._reset()
        self._step_start: float | None = None
        self._prev_tokens: float | None = 0.0
        self._last_eval: tuple | None = None

    def _reset(self) -> None:
        self._elapsed, self._steps = 0.0, 0
        self._blocks = {"generation": 0.0, "reward": 0.0}

    def add_block(self, kind: str, seconds: float) -> None:
        """Seconds spent in `kind` ("generation" | "reward"); counted only inside a training step."""
        if self._step_start is not None:
            self._blocks[kind] += seconds

    def timed(self, kind: str, fn: Callable) -> Callable:
        """`fn`, its seconds added to `kind`."""
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add_block(kind, time.perf_counter() - start)

        run.__wrapped__ = fn
        run.rlt_console_timed = True
        return run

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()
        self._step_start = None
        self._prev_tokens = 0.0 if state.global_step == 0 else None  # resumed: TRL's token count may restart
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self._elapsed += time.perf_counter() - self._step_start
            self._steps += 1
        self._step_start = None
        return control

    def timings(self, logs: dict) -> dict:
        """The ``timing/*`` values of the steps since the last record (then reset)."""
        out = {}
        if self._steps:
            step_s = self._elapsed / self._steps
            out["timing/step_s"] = step_s
            if self.times_blocks:
                gen, reward = self._blocks["generation"] / self._steps, self._blocks["reward"] / self._steps
                out.update({"timing/generation_s": gen, "timing/reward_s": reward,
                            "timing/train_s": max(step_s - gen - reward, 0.0)})
        tokens = logs.get("num_tokens")
        if isinstance(tokens, int | float):
            if self._prev_tokens is not None and self._elapsed > 0 and tokens >= self._prev_tokens:
                out["timing/tokens_per_s"] = (tokens - self._prev_tokens) / self._elapsed
            self._prev_tokens = tokens
        self._reset()
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return control
        main = state.is_world_process_zero
        if "train_runtime" in logs:
            if main:
                self.write(format_end(logs, state.global_step))
        elif any(k.startswith("eval_") for k in logs):
            seen = (state.global_step, logs.get("eval_loss"), logs.get("eval_reward"))
            if main and seen != self._last_eval:  # the SFT recipe's final evaluate() repeats the last step's
                self.write(format_eval(logs, state.global_step))
            self._last_eval = seen
        elif "loss" in logs or "reward" in logs:
            timing = self.timings(logs)
            logs.update(timing)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and "loss" in last:
                last.update(timing)  # transformers appended a copy of this record before the callbacks ran
            if main:
                self.write(format_step(logs, state.global_step, state.max_steps))
                for message in self.health.check(logs, state.global_step, args):
                    self.write(f"rlt: warning: {message}")
        return control


def quiet_trainer(trainer) -> None:
    """Make `trainer` print through `ConsoleLine` only: drop transformers' printer of the metrics dict and its progress
    bar (the recipes set ``disable_tqdm``), run the console callback first, and time the trainer's generation and
    reward calls (TRL's ``_generate`` and ``_calculate_rewards``, hooks `rlt.trl_patches` checks) for its line.
    Called by each recipe once its trainer is built."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    handler = trainer.callback_handler
    handler.callbacks = [cb for cb in handler.callbacks if not isinstance(cb, PrinterCallback | ProgressCallback)]
    consoles = [cb for cb in handler.callbacks if isinstance(cb, ConsoleLine)]
    handler.callbacks = consoles + [cb for cb in handler.callbacks if not isinstance(cb, ConsoleLine)]
    for console in consoles[:1]:
        for name, kind in (("_generate", "generation"), ("_calculate_rewards", "reward")):
            method = getattr(trainer, name, None)
            if method is not None and not getattr(method, "rlt_console_timed", False):
                setattr(trainer, name, console.timed(kind, method))
                console.times_blocks = True


# ---- third-party noise

# Known-harmless third-party log records, hidden unless verbose: (logger, message start, why it is harmless).
KNOWN_LOG_NOISE = (
    ("DeepSpeed", "Setting accelerator to CPU",
     "DeepSpeed's accelerator probe on a machine without a GPU, where rlt trains on CPU on purpose (use_cpu); it "
     "prints to stdout, between the console lines, when accelerate first imports DeepSpeed"),
    ("vllm.triton_utils.importing", "Triton is installed, but",
     "vLLM on a CPU-only machine: torch's triton wheel has no backend there and vLLM's CPU path does not use it"),
    ("vllm.triton_utils.importing", "Triton not installed or not compatible", "the same probe, its INFO line"),
)
# Known-harmless Python warnings, hidden unless verbose: (message regex, category, why it is harmless).
KNOWN_WARNINGS = (
    (r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning,
     "vLLM's triton dispatcher looks at every torch.distributed attribute when it builds the colocated engine, "
     "touching the deprecated alias; nothing in rlt or TRL uses it"),
)


class _KnownNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_installed_filters: list[tuple[logging.Logger, _KnownNoise]] = []


def configure_noise(verbose: bool) -> None:
    """Quiet third-party output unless `verbose` (the ``verbose`` key); idempotent, and reversible by calling it
    again. Quiet: no datasets map/filter bars, no transformers "Loading weights" / "Writing model shards" bars
    (Hub download bars stay: a long wait should show progress), transformers and datasets log errors only, TRL and
    vLLM warnings and errors only, and the `KNOWN_LOG_NOISE` / `KNOWN_WARNINGS` records hidden. Errors always show.
    Call it before the third-party code runs: a record already printed (vLLM's, when TRL imports it) stays."""
    import datasets
    import huggingface_hub.utils as hub_utils
    import transformers

    with warnings.catch_warnings():  # an HF_*_PROGRESS_BARS environment variable has priority: leave it
        warnings.simplefilter("ignore")
        if verbose:
            datasets.enable_progress_bars()
            transformers.utils.logging.enable_progress_bar()
        else:
            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()  # also the Hub's: turned back on just below
            if not _hub_bars_disabled_by_env():
                hub_utils.enable_progress_bars()
    transformers.utils.logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)
    datasets.utils.logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)
    for name in ("trl", "vllm"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)

    for logger, noise in _installed_filters:
        logger.removeFilter(noise)
    _installed_filters.clear()
    warnings.filters[:] = [f for f in warnings.filters if not _is_known_warning_filter(f)]
    if verbose:
        return
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix, _why in KNOWN_LOG_NOISE:
        by_logger[name] = (*by_logger.get(name, ()), prefix)
    for name, prefixes in by_logger.items():
        logger, noise = logging.getLogger(name), _KnownNoise(prefixes)
        logger.addFilter(noise)
        _installed_filters.append((logger, noise))
    for message, category, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _hub_bars_disabled_by_env() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_DISABLE_PROGRESS_BARS)


def _is_known_warning_filter(f) -> bool:
    action, message, category = f[0], f[1], f[2]
    return action == "ignore" and message is not None and any(
        message.pattern == m and category is c for m, c, _why in KNOWN_WARNINGS)
