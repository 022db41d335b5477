"""RLT recipe (Reinforcement Learning Teachers): GRPO on a teacher that sees question + solution and writes an
explanation; its reward is how well a frozen student then reproduces the solution, minus a KL term (rlt-spec §2).

setup (tokenizer, student tokenizer check → teacher RL prompts → student + reward) → `grpo.fit` with the teacher
reward linked to the live policy → one line per step with the reward terms (`rlt.console`) → save → summary.

The student is the trainer's reference model when `student_model` is null (the reference's choice: it follows
`sync_ref_model`), else a separately loaded frozen model kept on CPU between scoring rounds when
`offload_untrained_models` is set. Student and teacher must share the tokenizer: checked before any weights load.
"""

from __future__ import annotations

import csv
import logging
import math
import random
from pathlib import Path

from rlt.config import RLTRunConfig
from rlt.data.teacher import get_teacher_format, prepare_teacher_datasets, student_chat
from rlt.models import check_shared_tokenizer, load_tokenizer
from rlt.recipes import common, grpo
from rlt.rewards.build import build_reward_funcs
from rlt.rewards.teacher import TeacherKLReward
from rlt.samples import TERMS, reward_terms

log = logging.getLogger(__name__)


def train(run: RLTRunConfig) -> dict:
    out = common.prepare_run_dir(run)

    # ---- setup: tokenizers and prompts first, so their errors come before any weights load
    tokenizer = common.tokenizer_for(run)
    if run.student_model:
        student_tok = load_tokenizer(run.student_model, revision=run.model_revision,
                                     trust_remote_code=run.trust_remote_code, pad_token=run.pad_token)
        check_shared_tokenizer(tokenizer, student_tok, run.student_model)  # both repaired the same way
    train_ds, eval_ds = prepare_teacher_datasets(
        run.dataset_id_or_path, mode="rl", tokenizer=tokenizer, fmt=run.teacher_format, columns=run.data_columns,
        split=run.train_split, eval_split=run.eval_split if run.eval_steps else None,
        data_format=run.teacher_data_format, max_samples=run.max_train_samples,
        max_eval_samples=run.max_eval_samples, max_prompt_tokens=run.max_prompt_length, synthetic=run.synthetic,
        subset=run.dataset_subset, seed=run.seed)

    # ---- student and rewards
    share_reference = run.student_model is None and run.beta > 0 and not run.use_peft
    student = None if share_reference else common.model_for(run, tokenizer, run.student_model)
    reward_funcs = build_reward_funcs(run, student_model=student, tokenizer=tokenizer)
    teacher_rewards = [f.fn for f in reward_funcs if isinstance(f.fn, TeacherKLReward)]
    recorder = CompletionRecorder(out, tokenizer, get_teacher_format(run.teacher_format),
                                  run.save_completions_probability, run.logging_prob, seed=run.seed)
    for f in reward_funcs:
        if isinstance(f.fn, TeacherKLReward):
            f.fn = recorder.wrap(f.fn)

    def link(trainer):
        """TRL does not pass models to reward functions: give the teacher reward the live policy, or the reference
        model with `use_reference_teacher_model` (and the reference model as the student when `student_model` is
        null)."""
        for r in teacher_rewards:
            if run.use_reference_teacher_model:  # scored on the training device, an offloaded reference moved there
                r.set_teacher_model(trainer.ref_model, offload=trainer.offloads_reference)
                r.device = trainer.accelerator.device
            else:
                r.set_teacher_model(trainer.model)
            if share_reference:
                # an offloaded reference goes back to CPU after scoring, like a separate student
                r.set_student_model(trainer.ref_model, offload=trainer.offloads_reference)

    return grpo.fit(run, out, tokenizer, train_ds, eval_ds, reward_funcs, on_trainer=link)


class CompletionRecorder:
    """Samples what the teacher reward scored to disk: (prompt, completion, reward and its terms) rows with
    probability `save_probability` to `stored_completions/step_<N>.csv`, and student chats with probability
    `chat_probability` to `teacher_chats/log.txt`, their header line with the same terms (rlt-spec §2, §3.4). Wraps
    the reward call: the rows are known only there. The terms are `rlt.samples.TERMS` of the reward's `last_terms`
    (reward = log_prob_term - kl_term + match_reward); N is the step count when the rows were scored."""

    def __init__(self, out: Path, tokenizer, fmt, save_probability: float, chat_probability: float, seed: int):
        self.out, self.tokenizer, self.fmt = out, tokenizer, fmt
        self.save_probability, self.chat_probability = save_probability, chat_probability
        self.rng = random.Random(seed)

    def wrap(self, reward):
        """`reward` with every call's rows offered to `record` (unchanged when nothing is sampled)."""
        if not (self.save_probability or self.chat_probability):
            return reward

        def recorded(prompts, completions=None, **kwargs):
            rewards = reward(prompts, completions, **kwargs)
            self.record(prompts, completions, rewards, kwargs, reward_terms(reward) or {})
            return rewards

        return recorded

    def record(self, prompts, completions, rewards, kwargs, terms: dict[str, list[float]] | None = None) -> None:
        state = kwargs.get("trainer_state")
        step = state.global_step if state is not None else 0
        texts = completions or [""] * len(prompts)
        terms = {name: (terms or {}).get(name) or [math.nan] * len(prompts) for name in TERMS}
        rows = [i for i in range(len(prompts)) if self.rng.random() < self.save_probability]
        if rows:
            path = self.out / "stored_completions" / f"step_{step}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", "prompt", "completion", "reward", *TERMS])
                writer.writerows([step, prompts[i], texts[i], rewards[i], *(terms[t][i] for t in TERMS)]
                                 for i in rows)
        chats = [i for i in range(len(prompts)) if self.rng.random() < self.chat_probability]
        if chats and kwargs.get("question") and kwargs.get("solution"):
            path = self.out / "teacher_chats" / "log.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            close = self.fmt.explanation_close
            with open(path, "a") as f:
                for i in chats:
                    explanation = texts[i].split(close, 1)[0]
                    chat = student_chat(kwargs["question"][i], explanation, kwargs["solution"][i], self.fmt,
                                        self.tokenizer)
                    head = " ".join(f"{t} {terms[t][i]:.0f}" if t == "explanation_tokens" else f"{t} {terms[t][i]:.4f}"
                                    for t in TERMS)
                    f.write(f"=== step {step} reward {rewards[i]:.4f} {head}\n{chat}\n")

