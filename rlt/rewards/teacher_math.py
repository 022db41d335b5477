"""The pure math of the RLT teacher reward (`rlt.rewards.teacher`): reductions of per-token values, their
normalisations, the k3 KL estimator, tempered target log-probs, and the length buckets its batched scoring uses.
Each is a function of tensors or lists only, with its worked example in the docstring."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rlt.config import NORMALIZATIONS, REDUCTIONS
from rlt.errors import ConfigError

_QUANTILES = {"first_quartile": 0.25, "last_quartile": 0.75}
_LOGSOFTMAX_CHUNK = 512  # positions per float32 log_softmax chunk (bounds the float32 copy of the logits)


def reduce_values(values: torch.Tensor, name: str) -> float:
    """One reduction of a 1-D float tensor; NaN for an empty tensor. ``median`` is the lower median (the middle
    value; of an even count the smaller of the two middle values, as ``torch.median`` and the reference);
    ``first_quartile``/``last_quartile`` are linear-interpolation quantiles (``torch.quantile``).

    >>> x = torch.tensor([4.0, 1.0, 3.0, 2.0])
    >>> [reduce_values(x, n) for n in ("mean", "sum", "min", "max", "median", "first_quartile", "last_quartile")]
    [2.5, 10.0, 1.0, 4.0, 2.0, 1.75, 3.25]

    (sorted 1, 2, 3, 4: lower median 2; q25 at rank 0.25·3 = 0.75 -> 1 + 0.75·(2 - 1); q75 at rank 2.25 -> 3.25)
    """
    if values.numel() == 0:
        return math.nan
    values = values.float()
    if name == "mean":
        return values.mean().item()
    if name == "sum":
        return values.sum().item()
    if name == "min":
        return values.min().item()
    if name == "max":
        return values.max().item()
    if name == "median":
        return values.median().item()
    if name in _QUANTILES:
        return torch.quantile(values, _QUANTILES[name]).item()
    raise ConfigError(f"unknown reduction {name!r}; expected one of {list(REDUCTIONS)}")


def length_buckets(lengths: Sequence[int], max_padding: float = 1.25, slack: int = 256) -> list[list[int]]:
    """Split positions ``0..n-1`` of `lengths` (sorted longest first) into consecutive buckets, each padded to its
    first (longest) length. The next length joins the current bucket while the padded size stays within
    `max_padding` x the real token count, or wastes at most `slack` padded tokens (a forward more costs more than a
    little padding).

    >>> length_buckets([128, 112, 96, 64, 48, 32, 24, 16], slack=64)
    [[0, 1, 2], [3, 4, 5], [6, 7]]

    (128+112: 256 padded for 240 real, ok; +96: 384 vs 336 (x1.14) ok; +64: 512 vs 400, x1.28 and 112 wasted: new
    bucket; 64+48: 128 vs 112 ok; +32: 192 vs 144, x1.33 but 48 wasted <= 64: ok; +24: 256 vs 168, x1.52 and 88
    wasted: new bucket; 24+16: 48 vs 40 ok.)
    """
    buckets: list[list[int]] = []
    real = 0
    for k, n in enumerate(lengths):
        padded = (len(buckets[-1]) + 1) * lengths[buckets[-1][0]] if buckets else 0
        if buckets and (padded <= max_padding * (real + n) or padded - real - n <= slack):
            buckets[-1].append(k)
            real += n
        else:
            buckets.append([k])
            real = n
    return buckets


def normalize_values(values: torch.Tensor, name: str | None) -> torch.Tensor:
    """``none`` (identity), ``exp`` (e^x) or ``exp_norm`` (1 - e^-x).

    >>> x = torch.tensor([0.0, math.log(2.0)])
    >>> [normalize_values(x, n).tolist() for n in ("none", "exp", "exp_norm")]
    [[0.0, 0.6931471824645996], [1.0, 2.0], [0.0, 0.5]]

    (e^0 = 1, e^ln2 = 2; 1 - e^0 = 0, 1 - e^-ln2 = 1 - 1/2)
    """
    if name is None or name == "none":
        return values
    if name == "exp":
        return values.exp()
    if name == "exp_norm":
        return 1.0 - torch.exp(-values)
    raise ConfigError(f"unknown normalisation {name!r}; expected one of {list(NORMALIZATIONS)} or null")


def schulman_k3(d: torch.Tensor) -> torch.Tensor:
    """The k3 estimator from a k1 sample ``d = log q - log s``: ``d + e^-d - 1`` (>= 0).

    >>> [round(v, 4) for v in schulman_k3(torch.tensor([0.0, math.log(2.0), -math.log(2.0)])).tolist()]
    [0.0, 0.1931, 0.3069]

    (0 + 1 - 1 = 0; ln2 + 1/2 - 1 = 0.1931; -ln2 + 2 - 1 = 0.3069)
    """
    return d + torch.exp(-d) - 1.0


def target_logprobs(logits: torch.Tensor, targets: Sequence[int], temperature: float) -> torch.Tensor:
    """``log_softmax(logits / temperature)[t, targets[t]]`` in float32 on CPU; logits (T, V) row t predicts
    targets[t]. Chunked so the float32 copy of the logits stays bounded.

    >>> logits = torch.tensor([[0.0, math.log(3.0)]])
    >>> [round(target_logprobs(logits, [1], t).item(), 4) for t in (1.0, 0.5)]
    [-0.2877, -0.1054]

    (T = 1: softmax of (0, ln3) = (1/4, 3/4), ln 0.75 = -0.2877; T = 0.5: (0, 2 ln3) -> (1/10, 9/10), ln 0.9)
    """
    targets_t = torch.tensor(list(targets), dtype=torch.long, device=logits.device)
    parts = []
    for c in range(0, len(targets_t), _LOGSOFTMAX_CHUNK):
        x = logits[c: c + _LOGSOFTMAX_CHUNK].float()
        if temperature != 1.0:
            x = x / temperature
        parts.append(x.gather(-1, targets_t[c: c + _LOGSOFTMAX_CHUNK, None]).squeeze(-1) - torch.logsumexp(x, dim=-1))
    return torch.cat(parts).cpu()


def position_chunks(start: int, stop: int, rows: int, budget: int) -> list[tuple[int, int]]:
    """Consecutive ``[c0, c1)`` ranges covering ``[start, stop)``, each of at most ``max(1, budget // rows)``
    positions: the forwards that keep at most `budget` logit positions of a `rows`-row batch.

    >>> position_chunks(0, 10, rows=2, budget=8), position_chunks(3, 5, rows=4, budget=64), position_chunks(2, 2, 1, 8)
    ([(0, 4), (4, 8), (8, 10)], [(3, 5)], [])

    (2 rows, budget 8: 4 positions per forward; 4 rows, budget 64: 16, so one range; an empty range: none)
    """
    size = max(1, budget // max(1, rows))
    return [(c, min(stop, c + size)) for c in range(start, stop, size)]
