"""Scored samples: every `samples_every` logged steps, a few of the completions the trainer just scored, with the
reward broken down, to ``samples.jsonl`` in the run dir and, when wandb runs, to a ``wandb.Table`` (key ``samples``).

One row per completion: ``step`` (the step whose metrics record holds the round's reward: `state.global_step` when
it is logged, as in metrics.jsonl and TRL's ``log_completions``), ``prompt`` (a chat prompt: its last user message),
``completion``, ``reward`` (the weighted sum of the reward functions, TRL's logged ``reward``), ``advantage``, one
column per reward function (its name, as in ``rewards/<name>/mean``), and for a reward that keeps its per-row terms
(``last_terms``, `rlt.rewards.TeacherKLReward`) the `TERMS` (a reward whose terms would clash gets ``<name>/`` in
front). `rlt.trainers.GRPOTrainer._calculate_rewards` offers each scored round (`offer_scored`); `SamplesRecorder`,
a callback, keeps the last training round of the main process and writes its rows when the step is logged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

SAMPLES_FILE = "samples.jsonl"
WANDB_KEY = "samples"
# the per-row terms of a reward with `last_terms` (the RLT teacher reward: reward = log_prob_term - kl_term +
# match_reward; explanation_tokens: the sampled explanation's length)
TERMS = ("log_prob_term", "kl_term", "match_reward", "explanation_tokens")


@dataclass
class Scored:
    """One scored round of this process: its rows in the trainer's order (groups of `group` completions)."""

    prompts: list
    completions: list
    reward: list[float]  # the weighted sum over the reward functions
    per_func: dict[str, list[float]]  # reward function name -> its values
    terms: dict[str, list[float]]  # column -> a reward's per-row term
    group: int  # completions per prompt (num_generations)
    gathered: int  # rows of the round over all processes (TRL logs their advantages)


def reward_terms(reward_func) -> dict[str, list[float]] | None:
    """The `TERMS` of the last call of `reward_func` or of a reward it wraps (``__wrapped__``: `rlt.rewards.guard`),
    one list per term; None for a reward without ``last_terms``."""
    seen = set()
    while reward_func is not None and id(reward_func) not in seen:
        seen.add(id(reward_func))
        terms = getattr(reward_func, "last_terms", None)
        if isinstance(terms, dict):
            return {name: list(terms[name]) for name in TERMS if name in terms}
        reward_func = getattr(reward_func, "__wrapped__", None)
    return None


def offer_scored(trainer, prompts, completions, rewards_per_func) -> None:
    """Hand a round the trainer has scored (`rewards_per_func`: TRL's (rows of every process, functions) tensor) to
    the `SamplesRecorder` among its callbacks; nothing without one, on another process, or in evaluation."""
    recorders = [c for c in trainer.callback_handler.callbacks if isinstance(c, SamplesRecorder)]
    if not recorders or not trainer.accelerator.is_main_process or not trainer.model.training:
        return
    n = len(prompts)
    start = trainer.accelerator.process_index * n
    local = rewards_per_func[start:start + n].detach().float().cpu()
    weights = trainer.reward_weights.detach().float().cpu()
    total = (local * weights.unsqueeze(0)).nansum(dim=1)  # TRL's logged reward per row
    total[local.isnan().all(dim=1)] = math.nan  # a row no function scored
    per_func = {name: _float32(local[:, i]) for i, name in enumerate(trainer.reward_func_names)}
    terms: dict[str, list[float]] = {}
    found = [(name, t) for name, f in zip(trainer.reward_func_names, trainer.reward_funcs, strict=True)
             if (t := reward_terms(f))]
    for name, values in found:
        for term, column in values.items():
            if len(column) == n:
                terms[term if len(found) == 1 else f"{name}/{term}"] = column
    scored = Scored(prompts=list(prompts), completions=list(completions), reward=_float32(total), per_func=per_func,
                    terms=terms, group=max(int(trainer.num_generations), 1), gathered=int(rewards_per_func.size(0)))
    for recorder in recorders:
        recorder.capture(trainer, scored)


def sample_order(n: int, group: int) -> list[int]:
    """Rows `0..n-1` in groups of `group`: the first of every group, then the second of every group, ...

    Worked example: n 8, group 4 -> [0, 4, 1, 5, 2, 6, 3, 7]; n 5, group 2 -> [0, 2, 4, 1, 3].
    """
    groups = -(-n // group)
    return [g * group + j for j in range(group) for g in range(groups) if g * group + j < n]


def text(value: Any) -> str:
    """A prompt or completion as text: a string as is; a chat, the content of its last message when that is the
    assistant's (a completion), else of its last user message (a prompt); text parts of list contents joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(m, dict) and "role" in m for m in value):
        users = [m for m in value if m["role"] == "user"]
        return text((value[-1] if value[-1]["role"] == "assistant" or not users else users[-1]).get("content"))
    if isinstance(value, list | tuple):  # content parts
        return "".join((p.get("text") or "") if isinstance(p, dict) else str(p) for p in value)
    return "" if value is None else str(value)


def _number(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _float32(values) -> list[float]:
    """float32 values as the shortest decimals that are those float32s (0.605, not 0.6050000190734863)."""
    return [float(str(v)) for v in torch.as_tensor(values, dtype=torch.float32).numpy()]


class SamplesRecorder(TrainerCallback):
    """At the logged steps 1, 1 + `every`, 1 + 2 × `every`, ... (counted in logged steps, `logging_steps` apart):
    `per_dump` rows of the last round scored since the previous log (`sample_order`: the first completion of each
    group first) appended to `path` as JSON lines, and logged to wandb as a Table when a wandb run is active. A due
    step that scored no round (a generation round feeds several steps) takes the next logged step's round."""

    def __init__(self, path: str | Path, every: int, per_dump: int):
        self.path = Path(path)
        self.every, self.per_dump = every, per_dump
        self.scored: Scored | None = None
        self.trl_logs = None  # the trainer's TRL `_logs` (not the trainer: no reference cycle)
        self.due = False

    def capture(self, trainer, scored: Scored) -> None:
        self.trl_logs, self.scored = getattr(trainer, "_logs", None), scored

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # a training step's log (not an evaluation's, nor the final summary)
            return control
        scored, self.scored = self.scored, None  # a round belongs to the step whose log follows it
        logged = max(state.global_step // max(args.logging_steps, 1), 1)  # 1 for the first logged step
        self.due = self.due or (logged - 1) % self.every == 0
        if not self.due or scored is None:
            return control
        self.due = False
        if state.is_world_process_zero:
            rows = self.rows(scored, state.global_step)
            self.write(rows)
            self.log_to_wandb(args, state, rows)
        return control

    def rows(self, scored: Scored, step: int) -> list[dict]:
        advantages = self._advantages(scored)
        out = []
        for i in sample_order(len(scored.prompts), scored.group)[:self.per_dump]:
            row = {"step": step, "prompt": text(scored.prompts[i]), "completion": text(scored.completions[i]),
                   "reward": _number(scored.reward[i]),
                   "advantage": _number(advantages[i]) if advantages is not None else None}
            row.update({name: _number(values[i]) for name, values in scored.per_func.items()})
            row.update({name: _number(values[i]) for name, values in scored.terms.items()})
            out.append(row)
        return out

    def _advantages(self, scored: Scored) -> list[float] | None:
        """This process's rows of the advantages TRL logged for the round (its ``_logs``, what ``log_completions``
        shows); None when its last logged round is not this one (an evaluation since)."""
        try:
            advantages = list(self.trl_logs["advantages"])[-scored.gathered:]
            completions = list(self.trl_logs["completion"])[-scored.gathered:]
        except (TypeError, KeyError):
            return None
        n = len(scored.completions)
        if len(advantages) != scored.gathered or completions[:n] != scored.completions:
            return None
        return _float32(advantages[:n])

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    def log_to_wandb(self, args, state, rows: list[dict]) -> None:
        if not rows or "wandb" not in (args.report_to or []):
            return
        import wandb

        if wandb.run is None:
            return
        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        wandb.log({WANDB_KEY: table, "train/global_step": state.global_step})


def callbacks_for(run, out: Path) -> list:
    """The samples callback for this run (none with ``samples_every: 0``)."""
    if not getattr(run, "samples_every", 0):
        return []
    return [SamplesRecorder(Path(out) / SAMPLES_FILE, run.samples_every, run.samples_per_dump)]
