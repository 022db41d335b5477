"""Turn `reward_funcs` config entries into TRL reward callables.

An entry is `{_target_: dotted.path, **kwargs}`. A function target is used as is (kwargs bound with a partial that
keeps its name, which TRL logs as `rewards/<name>`); a class target is constructed with the kwargs plus any runtime
objects its constructor accepts (e.g. `student_model`, `tokenizer` for the teacher reward). Every callable is wrapped
by `guard_reward`, so NaN/inf/None rewards become `penalty` and are counted instead of poisoning the advantages.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from rlt.rewards.guard import guard_reward


def _import(target: str):
    module_name, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def build_reward_funcs(specs: list[dict[str, Any]], *, penalty: float, **runtime: Any) -> list:
    """[{_target_, **kwargs}] -> guarded reward callables, in order (the order of `reward_weights`)."""
    funcs = []
    for spec in specs:
        kwargs = {k: v for k, v in spec.items() if k != "_target_"}
        obj = _import(spec["_target_"])
        if inspect.isclass(obj):
            accepted = inspect.signature(obj).parameters
            extra = {k: v for k, v in runtime.items() if k in accepted and k not in kwargs}
            fn = obj(**kwargs, **extra)
            name = getattr(fn, "__name__", None) or obj.__name__
        elif kwargs:
            fn = functools.update_wrapper(functools.partial(obj, **kwargs), obj)
            name = obj.__name__
        else:
            fn, name = obj, obj.__name__
        funcs.append(guard_reward(fn, penalty=penalty, name=name))
    return funcs
