"""Asynchronous generation (`async_generation=true` with `generation_backend=vllm_server`): the vLLM servers sample the
next `max_staleness` generation rounds while the trainer scores and trains the current one.

A round is the generation batch TRL's sampler hands the trainer every steps_per_generation × num_iterations
micro-steps. At the first micro-step of round r, `AsyncRounds.generate`

1. takes round r's completions, submitted earlier (or samples them now: the first round of a run, of a resumed run
   and of each epoch);
2. pushes the policy's weights to the servers if an optimizer step changed them, then submits the rounds after r (up
   to `max_staleness` of them, none past `max_steps`), read ahead from the training data loader (`Lookahead`);
3. returns, and the trainer scores round r (rewards, reference log-probs) and trains on it while the servers sample.

A round sampled by the weights of optimizer step v and trained at step s is s − v steps stale. The servers report
which weights sampled each round (their update count, mapped back to the step that pushed it), so the staleness is
measured, not assumed; the importance-sampling ratio exp(log p_train − log p_sampling) that the trainer already
applies (`vllm_importance_sampling_correction`) corrects it. Both are logged: ``async/staleness``,
``sampling/importance_sampling_ratio/*``, and ``async/wait_seconds`` (how long the trainer waited for a round).

Nothing about the queue is checkpointed: which prompts a step trains on is decided by the data loader alone, so a
killed run resumes at its checkpoint's data position, samples that round again and neither loses nor repeats one.
How this compares with TRL's experimental async trainer and what it measured: docs/distributed.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class Lookahead:
    """An iterator that can be read ahead: `next` gives what the wrapped iterator gives; `peek(k)` the item k places
    after the next one (None past the end), kept for a later `next`. `position`: items taken by `next` so far.

    >>> it = Lookahead(iter("abc"))
    >>> it.peek(1), next(it), it.position, it.peek(0), it.peek(5), list(it)
    ('b', 'a', 1, 'b', None, ['b', 'c'])
    """

    def __init__(self, source: Iterator):
        self.source = source
        self.position = 0
        self._ahead: collections.deque = collections.deque()

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self) -> Any:
        item = self._ahead.popleft() if self._ahead else next(self.source)
        self.position += 1
        return item

    def peek(self, k: int) -> Any:
        while len(self._ahead) <= k:
            try:
                self._ahead.append(next(self.source))
            except StopIteration:
                return None
        return self._ahead[k]


@dataclasses.dataclass
class PendingRound:
    """A generation round submitted to the servers: this rank's prompt ids (each repeated num_generations times in a
    row), and on rank 0 the `future` of the servers' answer."""

    prompts: list[list[int]]
    future: concurrent.futures.Future | None


def in_background(fn: Callable, /, *args, **kwargs) -> concurrent.futures.Future:
    """`fn(*args, **kwargs)` on a new daemon thread; its result or exception in the returned future. A daemon: an
    exiting trainer does not wait for a round nobody will train on."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(e)

    threading.Thread(target=run, name="rlt-rollout", daemon=True).start()
    return future


def rounds_to_submit(current: int, every: int, ahead: int, submitted: Iterable[int], end: int) -> list[int]:
    """Stream positions of the rounds to submit when the round starting at position `current` is taken: the `ahead`
    rounds after it (one every `every` positions), less those already `submitted`, less any at or past `end` (the
    first position that will not be trained).

    Worked example: current 8, every 4, ahead 2, submitted [12], end 100 -> the rounds at 12 and 16, 12 already
    submitted -> [16]; with end 14 -> [] (16 is never trained); ahead 1 and nothing submitted -> [12].
    """
    taken = set(submitted)
    return [p for p in (current + every * k for k in range(1, ahead + 1)) if p < end and p not in taken]


def staleness(trained_at: int, sampled_by: int | None) -> float:
    """Optimizer steps between the weights that sampled a round (`sampled_by`, None = unknown) and the step that
    trains on it: 7 - 6 = 1; unknown -> nan."""
    return math.nan if sampled_by is None else float(trained_at - sampled_by)


class AsyncRounds:
    """The trainer's side of asynchronous generation (see the module docstring); `rlt.trainers.GRPOTrainer` owns one
    when `max_staleness` ≥ 1 and calls `wrap` (its `get_batch_samples`), `handed_out`, `locate` (its
    `_prepare_inputs`) and `generate` (its `_generate_single_turn`, in training)."""

    def __init__(self, trainer, max_staleness: int):
        if max_staleness < 1:
            raise ValueError(f"max_staleness={max_staleness} must be >= 1")
        self.trainer = trainer
        self.max_staleness = max_staleness
        self.stream: Lookahead | None = None
        self.handed: collections.deque = collections.deque()  # (position, batch) handed out, not yet prepared
        self.current: int | None = None  # stream position of the batch being prepared
        self.pending: dict[int, PendingRound] = {}  # by stream position
        self.rounds_sampled_ahead = 0
        self.rounds_sampled_now = 0
        self.mispredicted = 0

    # ---- where the training loop is in the data stream

    def wrap(self, epoch_iterator: Iterator) -> Lookahead:
        """The iterator the training loop reads from: `epoch_iterator` made readable ahead (one per epoch)."""
        if self.stream is None or self.stream.source is not epoch_iterator:
            self.stream = Lookahead(epoch_iterator)
            self.handed.clear()
            self.pending.clear()  # rounds are never read ahead past an epoch's end: nothing is lost here
        return self.stream

    def handed_out(self, batches: list) -> None:
        """The training loop just took `batches`, the last ones `next` gave."""
        start = self.stream.position - len(batches)
        self.handed.extend((start + i, batch) for i, batch in enumerate(batches))

    def locate(self, batch: Any) -> None:
        """The trainer prepares `batch`: remember its position (None if it did not come through `wrap`)."""
        self.current = None
        while self.handed:
            position, item = self.handed.popleft()
            if item is batch:
                self.current = position
                return

    def _item_at(self, position: int) -> Any:
        if position >= self.stream.position:
            return self.stream.peek(position - self.stream.position)
        return next((item for p, item in self.handed if p == position), None)

    # ---- a round

    def generate(self, prompt_ids: list[list[int]], num_generations: int) -> tuple[list, list | None]:
        """This round's (completion_ids, sampling log-probs of the sampled tokens), as TRL's `_generate_single_turn`
        returns them; the following rounds submitted before returning."""
        trainer = self.trainer
        generation = trainer.vllm_generation
        start = time.perf_counter()
        pending = self.pending.pop(self.current, None) if self.current is not None else None
        ahead = pending is not None and pending.prompts == list(prompt_ids)
        if pending is not None and not ahead:
            self.mispredicted += 1
            log.warning("async generation: the round read ahead is not the one the trainer got; sampling it now")
        if not self._all_ranks(ahead):
            self.pending.clear()  # whatever was read ahead is off: sample from here on
            self._sync_weights()
            pending = generation.submit(list(prompt_ids), num_generations)
        _, completion_ids, logprobs, version = generation.collect(pending)
        waited = time.perf_counter() - start
        if ahead:
            self.rounds_sampled_ahead += 1
        else:
            self.rounds_sampled_now += 1
        self._submit_ahead(num_generations)
        metrics = trainer._metrics["train"]
        metrics["async/staleness"].append(staleness(trainer.state.global_step, generation.step_of_version(version)))
        metrics["async/wait_seconds"].append(waited)
        metrics["async/rounds_ahead"].append(float(len(self.pending)))
        return completion_ids, logprobs

    def _all_ranks(self, flag: bool) -> bool:
        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:
            return flag
        from accelerate.utils import gather_object

        return all(gather_object([flag]))

    def _fewest_across_ranks(self, count: int) -> int:
        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:
            return count
        from accelerate.utils import gather_object

        return min(gather_object([count]))

    def _sync_weights(self) -> None:
        """Push the policy to the servers if an optimizer step changed it since the last push (as TRL does)."""
        trainer = self.trainer
        if trainer.state.global_step != trainer._last_loaded_step:
            from trl.extras.profiling import profiling_context

            with profiling_context(trainer, "sync_weights"):
                trainer.vllm_generation.sync_weights()
            trainer._last_loaded_step = trainer.state.global_step

    def _submit_ahead(self, num_generations: int) -> None:
        """Submit the next rounds, with the current weights, up to `max_staleness` ahead and none past max_steps."""
        if self.current is None or self.stream is None:
            return
        trainer = self.trainer
        every = trainer.args.steps_per_generation * trainer.num_iterations
        accumulation = trainer.args.gradient_accumulation_steps
        remaining = (trainer.state.max_steps - trainer.state.global_step) * accumulation - trainer._step % accumulation
        positions = rounds_to_submit(self.current, every, self.max_staleness, self.pending, self.current + remaining)
        batches = []
        for position in positions:
            batch = self._item_at(position)
            if batch is None:  # the epoch ends first
                break
            batches.append((position, batch))
        batches = batches[:self._fewest_across_ranks(len(batches))]
        if not batches:
            return
        self._sync_weights()
        for position, batch in batches:
            prompt_ids, _, _ = trainer._tokenize_prompts(copy.deepcopy([row["prompt"] for row in batch]))
            self.pending[position] = trainer.vllm_generation.submit(prompt_ids, num_generations)
