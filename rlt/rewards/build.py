"""The run's reward callables from its `reward_funcs` entries (`{_target_: dotted.path, **kwargs}`), each guarded
against NaN/inf/None rewards (`rlt.rewards.guard`). docs/grpo.md "Prompts, rewards"."""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from rlt.rewards.guard import guard_reward


def _import(target: str):
    module_name, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def build_reward_funcs(run, **runtime: Any) -> list:
    """The guarded reward callables of `run.reward_funcs`, in order (the order of `reward_weights`).

    A function target is used as is (kwargs bound with a partial that keeps its name, which TRL logs as
    ``rewards/<name>``). A class with `from_run` (`TeacherKLReward`) is built from the run config, its entry's
    kwargs overriding the run's keys, plus the `runtime` objects `from_run` accepts (``student_model``,
    ``tokenizer``); another class is constructed with its kwargs plus the `runtime` objects its constructor accepts.
    """
    funcs = []
    for spec in run.reward_funcs:
        kwargs = {k: v for k, v in spec.items() if k != "_target_"}
        obj = _import(spec["_target_"])
        if inspect.isclass(obj):
            make = getattr(obj, "from_run", None)
            accepted = inspect.signature(make or obj).parameters
            extra = {k: v for k, v in runtime.items() if k in accepted and k not in kwargs}
            fn = make(run, **kwargs, **extra) if make else obj(**kwargs, **extra)
            name = getattr(fn, "__name__", None) or obj.__name__
        elif kwargs:
            fn = functools.update_wrapper(functools.partial(obj, **kwargs), obj)
            name = obj.__name__
        else:
            fn, name = obj, obj.__name__
        funcs.append(guard_reward(fn, penalty=run.nonfinite_reward_penalty, name=name))
    return funcs
