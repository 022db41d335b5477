"""`guard_reward`: make a reward function's output safe for the trainer without hiding bugs.

A reward that raises is a bug, so exceptions propagate unchanged. Values that would poison the advantages (None, NaN,
±inf) are replaced by a fixed penalty, counted, reported through TRL's ``log_metric`` kwarg as
``rewards/<name>/nonfinite`` and logged as a warning. A result of the wrong length, or that is not a list of numbers,
raises a ValueError naming the function.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


def _callable_name(fn: Callable) -> str:
    """The name TRL would log `fn` under (as trl.trainer.utils.get_callable_name: partials unwrapped, then
    ``__name__``, else the class name)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _is_async(fn: Callable) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    # Like trl.trainer.utils.is_async_callable: an async callable instance carries the `async` on its __call__.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class GuardedReward:
    """A reward callable wrapping `fn` (see `guard_reward`). Picklable when `fn` is."""

    def __init__(self, fn: Callable, *, penalty: float, name: str) -> None:
        self.fn = fn
        self.__wrapped__ = fn
        self.penalty = penalty
        self.__name__ = name
        self.__doc__ = getattr(fn, "__doc__", None)

    def __repr__(self) -> str:
        return f"guard_reward({self.fn!r}, penalty={self.penalty}, name={self.__name__!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> list[float]:
        return self._check(self.fn(*args, **kwargs), kwargs)

    def _check(self, result: Any, kwargs: Mapping[str, Any]) -> list[float]:
        name = self.__name__
        if result is None or isinstance(result, str | bytes | Mapping):
            raise ValueError(f"reward function '{name}' returned {type(result).__name__}, expected a list of floats "
                             "(one per completion)")
        try:
            values = list(result)
        except TypeError as e:
            raise ValueError(f"reward function '{name}' returned {type(result).__name__}, expected a list of floats "
                             "(one per completion)") from e
        expected_from = next((k for k in ("completions", "prompts") if kwargs.get(k) is not None), None)
        if expected_from is not None and len(values) != len(kwargs[expected_from]):
            raise ValueError(f"reward function '{name}' returned {len(values)} rewards for "
                             f"{len(kwargs[expected_from])} {expected_from} (expected one per completion)")
        out: list[float] = []
        replaced = 0
        for i, value in enumerate(values):
            if value is None:
                number = math.nan
            elif isinstance(value, str | bytes):
                raise ValueError(f"reward function '{name}' returned a non-numeric reward {value!r} at index {i}")
            else:
                try:
                    number = float(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"reward function '{name}' returned a non-numeric reward {value!r} "
                                     f"({type(value).__name__}) at index {i}") from e
            if not math.isfinite(number):
                replaced += 1
                number = self.penalty
            out.append(number)
        if replaced:
            logger.warning("Reward function '%s': replaced %d of %d None/NaN/inf reward(s) with the penalty %s",
                           name, replaced, len(out), self.penalty)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            # Reported on every call (0 included) so that TRL's per-step average is the mean count per batch.
            log_metric(f"rewards/{name}/nonfinite", float(replaced))
        return out


class AsyncGuardedReward(GuardedReward):
    """`GuardedReward` for an async reward function (TRL awaits it on its event loop)."""

    async def __call__(self, *args: Any, **kwargs: Any) -> list[float]:  # type: ignore[override]
        return self._check(await self.fn(*args, **kwargs), kwargs)


def guard_reward(fn: Callable, *, penalty: float, name: str | None = None) -> GuardedReward:
    """Wrap the reward callable `fn`: None/NaN/±inf rewards become `penalty` (a finite float).

    The wrapper passes every argument through to `fn` (including TRL's ``trainer_state``, ``log_extra``,
    ``log_metric`` and dataset columns) and returns a list of floats. Exceptions raised by `fn` propagate. When the
    result is not a sequence of numbers, or its length differs from the ``completions`` (else ``prompts``) keyword
    argument, a ValueError naming the function is raised. The number of replaced values is passed to
    ``log_metric(f"rewards/{name}/nonfinite", count)`` when the caller supplies ``log_metric`` (TRL does), on every
    call, and logged as a warning when non-zero.

    The wrapper's ``__name__`` (what TRL logs as ``rewards/<name>/mean``) is `name`, else `fn`'s name. Async
    functions give an async wrapper.
    """
    if not callable(fn):
        raise TypeError(f"guard_reward needs a callable, got {type(fn).__name__}")
    if isinstance(penalty, bool) or not isinstance(penalty, int | float) or not math.isfinite(penalty):
        raise ValueError(f"guard_reward penalty must be a finite number, got {penalty!r}")
    reward_name = name if name is not None else _callable_name(fn)
    if not isinstance(reward_name, str) or not reward_name:
        raise ValueError(f"guard_reward name must be a non-empty string, got {reward_name!r}")
    cls = AsyncGuardedReward if _is_async(fn) else GuardedReward
    return cls(fn, penalty=float(penalty), name=reward_name)
