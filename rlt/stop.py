"""Stopping a run on a signal without losing work: SIGTERM (what a cluster scheduler sends before it preempts a job)
or a first Ctrl-C saves a complete checkpoint at the next step boundary and stops; a second Ctrl-C exits at once.
Either way the same command resumes (docs/runs.md).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from transformers import TrainerCallback

from rlt.errors import RltError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(RltError):
    """The run stopped early on a signal after saving a checkpoint; the process exits with 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop(TrainerCallback):
    """Installs SIGINT/SIGTERM handlers for the length of `trainer.train` (main thread only). A signal marks the
    stop; at the end of the running optimizer step every process agrees on it (one all-reduce when distributed),
    the Trainer saves a checkpoint and stops. `stop_reason` then names the signal; `raise_if_stopped` turns it into
    `RunStopped` so that the recipe writes no final model or summary for an unfinished run."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return control

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # the second Ctrl-C: now
            sys.stderr.write("\nrlt: stopped at once (second Ctrl-C); the same command resumes from the last complete "
                             "checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        if self.signum is None:
            self.signum = signum
            sys.stderr.write(f"\nrlt: {signal.Signals(signum).name} received: saving a checkpoint at the end of this "
                             "step, then stopping (Ctrl-C again to stop at once)\n")
            sys.stderr.flush()

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
        return control

    def _agreed(self) -> bool:
        """Whether any process got a signal: processes stop at the same step or a collective would hang."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum is not None
        import torch

        flag = torch.tensor([self.signum or 0], dtype=torch.int64,
                            device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item()) or None
        return self.signum is not None


def raise_if_stopped(trainer, output_dir: str) -> None:
    """Raise `RunStopped` (one line, exit 128 + signal) if `trainer.train` ended on a signal, naming the checkpoint
    it saved."""
    stop = next((c for c in trainer.callback_handler.callbacks if isinstance(c, GracefulStop)), None)
    if stop is None or stop.signum is None:
        return
    step = trainer.state.global_step
    raise RunStopped(f"stopped by {signal.Signals(stop.signum).name} after step {step} of {trainer.state.max_steps}: "
                     f"{output_dir}/checkpoint-{step} saved; the same command resumes from it", stop.signum)
