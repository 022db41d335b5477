"""Per-token log-probs of the scored suffixes of many sequences under one frozen model, batched for speed and bounded
in memory: the forward machinery of the RLT teacher reward (`rlt.rewards.teacher.TeacherKLReward`).

A sequence ``seq`` with start ``s`` asks for ``log_softmax(logits / tau)`` of ``seq[s:]`` (each token scored by the
logits of the position before it), in float32 on CPU. `TokenScorer.plan` decides the micro-batches: sequences that
share their unscored prefix ``seq[:s]`` (the G completions of one prompt) run that prefix once and score their
suffixes on its KV cache (`_Shared`); otherwise sequences are length-sorted, left-padded and scored whole
(`_Whole`). No forward runs more than ``tokens_per_forward`` rows × positions (`position_chunks`: longer inputs run
in chunks on the KV cache), and only the scored positions get logits (``logits_to_keep``). Under ZeRO-3 every rank
runs the same number of forwards (the collective weight gathering needs it).
"""

from __future__ import annotations

import copy
import inspect
from typing import NamedTuple

import torch

from rlt.rewards.teacher_math import length_buckets, position_chunks, target_logprobs


def _unwrap(model):
    for _ in range(8):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    return model


def is_partitioned(model) -> bool:
    """Whether `model`'s parameters are ZeRO-3 partitions (DeepSpeed tags them with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


class _Whole(NamedTuple):
    """Whole sequences `idx`, left-padded, scored in the forwards `spans` (position ranges)."""
    idx: list[int]
    spans: list[tuple[int, int]]

    @property
    def forwards(self) -> int:
        return len(self.spans)


class _Shared(NamedTuple):
    """Prompt groups sharing their prefix: the prefix forwards `prefix_spans`, then each suffix piece (rows
    ``(group, sequence)``) in the forwards of its `piece_spans` entry."""
    groups: list[list[int]]
    pieces: list[list[tuple[int, int]]]
    prefix_spans: list[tuple[int, int]]
    piece_spans: list[list[tuple[int, int]]]

    @property
    def forwards(self) -> int:
        return len(self.prefix_spans) + sum(map(len, self.piece_spans))


class TokenScorer:
    """Scores ``seq[start:]`` of sequences under a model (see the module docstring).

    Args:
        pad_token_id: the id padded rows are filled with (masked out; any id of the vocabulary).
        batch_size: sequences per micro-batch (suffixes per piece when prefixes are shared).
        share_prefixes: run a shared unscored prefix once for its group.
        tokens_per_forward: at most this many input positions (rows × positions) per forward.
    """

    def __init__(self, *, pad_token_id: int, batch_size: int = 8, share_prefixes: bool = True,
                 tokens_per_forward: int = 8192) -> None:
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.share_prefixes = share_prefixes
        self.tokens_per_forward = tokens_per_forward

    def plan(self, seqs: list[list[int]], starts: list[int]) -> list[_Whole | _Shared]:
        """The micro-batches `logprobs` runs, in order, each with its forwards (`_Whole`, `_Shared`).

        Sequences whose unscored prefixes ``seq[:start]`` are identical (the G completions of one prompt) are scored
        together: the prefix runs once, its KV cache is shared by the group's suffixes (`_shared_prefix_batch`).
        Micro-batches hold up to `batch_size` sequences; with `batch_size` 1, or when no prefix repeats, or when
        `share_prefixes` is off, every sequence is scored whole (`_whole_batch`: length-sorted, left-padded).
        A forward runs at most `tokens_per_forward` positions (`position_chunks`), on the KV cache of the previous.
        """
        todo = [i for i in range(len(seqs)) if len(seqs[i]) > starts[i]]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in todo:
            groups.setdefault(tuple(seqs[i][:starts[i]]), []).append(i)
        if self.share_prefixes and self.batch_size > 1 and len(groups) < len(todo) and all(starts[i] for i in todo):
            by_length = [sorted(g, key=lambda i: starts[i] - len(seqs[i])) for g in groups.values()]  # longest first
            by_length.sort(key=lambda g: len(seqs[g[0]]) - starts[g[0]], reverse=True)
            batches: list[list[list[int]]] = [[]]
            for group in by_length:  # whole groups per prefix forward, up to batch_size suffixes (or one group)
                if batches[-1] and sum(map(len, batches[-1])) + len(group) > self.batch_size:
                    batches.append([])
                batches[-1].append(group)
            plan = []
            for groups_ in filter(None, batches):
                pieces = self._suffix_pieces(seqs, starts, groups_)
                prefix = position_chunks(0, max(starts[g[0]] for g in groups_), len(groups_), self.tokens_per_forward)
                spans = [position_chunks(0, max(len(seqs[i]) - starts[i] for _, i in piece) - 1, len(piece),
                                         self.tokens_per_forward) for piece in pieces]
                plan.append(_Shared(groups_, pieces, prefix, spans))
            return plan
        todo.sort(key=lambda i: len(seqs[i]), reverse=True)
        return [_Whole(idx, self._whole_spans(seqs, starts, idx))
                for idx in (todo[b: b + self.batch_size] for b in range(0, len(todo), self.batch_size))]

    def _whole_spans(self, seqs, starts, idx) -> list[tuple[int, int]]:
        """The forwards ``[c0, c1)`` over the left-padded positions of the whole sequences `idx`: one forward of
        all ``L`` positions when they fit in `tokens_per_forward`; else the unscored head ``[0, L - 1 - n)`` (n =
        the longest scored span), then the scored positions ``[L - 1 - n, L - 1)``, each in chunks on the KV cache
        (position ``L - 1`` scores nothing)."""
        length, rows = max(len(seqs[i]) for i in idx), len(idx)
        if length * rows <= self.tokens_per_forward:
            return [(0, length)]
        first = length - 1 - max(len(seqs[i]) - starts[i] for i in idx)
        return (position_chunks(0, first, rows, self.tokens_per_forward)
                + position_chunks(first, length - 1, rows, self.tokens_per_forward))

    def _suffix_pieces(self, seqs, starts, groups) -> list[list[tuple[int, int]]]:
        """``(group, sequence)`` rows of `groups`, longest suffix first, in pieces of up to `batch_size` rows of
        similar lengths (`length_buckets`)."""
        rows = sorted(((j, i) for j, g in enumerate(groups) for i in g), key=lambda r: starts[r[1]] - len(seqs[r[1]]))
        buckets = length_buckets([len(seqs[i]) - starts[i] for _, i in rows])
        return [[rows[r] for r in bucket[c: c + self.batch_size]] for bucket in buckets
                for c in range(0, len(bucket), self.batch_size)]

    def logprobs(self, model, seqs: list[list[int]], starts: list[int], temperature: float,
                 device: torch.device) -> list[torch.Tensor]:
        """`model` in eval mode (its mode restored afterwards), no gradients: see `_token_logprobs`."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._token_logprobs(model, seqs, starts, temperature, device)
        finally:
            model.train(was_training)

    def _token_logprobs(self, model, seqs: list[list[int]], starts: list[int], temperature: float,
                        device: torch.device) -> list[torch.Tensor]:
        """For each sequence, float32 CPU log-probs of ``seq[start:]`` under `model` at `temperature`, in the
        micro-batches of `_plan`. A ZeRO-3-partitioned model gathers its weights collectively in every forward, so
        every rank must run as many forwards: the ranks agree on the largest count first, and a rank with fewer
        (other completions, other prefix groups) runs one-token forwards to match."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        plan = self.plan(seqs, starts)
        extra = self._forwards_to_match(model, sum(step.forwards for step in plan), device)
        keep_ok = "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
        for step in plan:
            if isinstance(step, _Whole):
                self._whole_batch(model, seqs, starts, step, temperature, device, keep_ok, out)
            else:
                self._shared_prefix_batch(model, seqs, starts, step, temperature, device, keep_ok, out)
        for _ in range(extra):
            model(input_ids=torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=device), use_cache=False)
        return out

    @staticmethod
    def _forwards_to_match(model, calls: int, device: torch.device) -> int:
        """How many more forwards than `calls` the busiest rank runs, for a ZeRO-3-partitioned `model` in a
        multi-process run (0 otherwise)."""
        if not is_partitioned(model) or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 0
        most = torch.tensor([calls], dtype=torch.long, device=device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return int(most.item()) - calls

    @staticmethod
    def _forward(model, keep_ok: bool, keep: int, **kwargs):
        """(logits of the last `keep` input positions, the KV cache): ``logits_to_keep`` when the model has it."""
        if keep_ok:
            kwargs["logits_to_keep"] = keep
        result = model(**kwargs)
        return result.logits[:, -keep:], result.past_key_values

    def _whole_batch(self, model, seqs, starts, step: _Whole, temperature, device, keep_ok, out) -> None:
        """Whole sequences, left-padded, explicit position ids, in the forwards of `step` (`_whole_spans`; more
        than one run on the KV cache of the previous ones), logits only for the scored positions."""
        idx, spans = step
        length = max(len(seqs[i]) for i in idx)
        n_scored = [len(seqs[i]) - starts[i] for i in idx]
        input_ids, mask = self._padded([seqs[i] for i in idx], length, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        first = length - 1 - max(n_scored)  # the first position whose logits score a token (p scores p + 1)
        cache, parts = None, [[] for _ in idx]
        for c0, c1 in spans:
            keep = c1 - max(c0, first) if c1 > first else 1
            logits, cache = self._forward(model, keep_ok, keep, input_ids=input_ids[:, c0:c1].to(device),
                                          attention_mask=mask[:, :c1].to(device),
                                          position_ids=positions[:, c0:c1].to(device), past_key_values=cache,
                                          use_cache=len(spans) > 1)
            lo = c1 - keep  # logits row k is position lo + k
            for r in range(len(idx)):
                p0, p1 = max(lo, length - 1 - n_scored[r]), min(c1, length - 1)
                if p1 > p0:
                    parts[r].append(target_logprobs(logits[r, p0 - lo: p1 - lo],
                                                    input_ids[r, p0 + 1: p1 + 1].tolist(), temperature))
            del logits
        del cache
        for r, i in enumerate(idx):
            out[i] = torch.cat(parts[r])

    def _shared_prefix_batch(self, model, seqs, starts, step: _Shared, temperature, device, keep_ok, out) -> None:
        """Score the `step`'s groups (lists of sequence indices; all sequences of a group share ``seq[:start]``): one
        forward of the prefixes (left-padded, one row per group, cache kept, logits of the last position only), then
        the suffixes (right-padded) on their groups' cached prefixes, up to `batch_size` at a time, in buckets of
        similar lengths (`length_buckets`) so that a short suffix is not padded to the longest one, each piece in
        the forwards of its position chunks. A group larger than `batch_size` (64 generations, batch 8)
        runs its prefix once. The first suffix token is scored by the prefix's last logits, suffix position t by
        the logits of position t - 1 (the last suffix token scores nothing)."""
        groups, pieces, prefix_spans, spans = step
        prefixes = [seqs[g[0]][:starts[g[0]]] for g in groups]
        p_len = max(len(p) for p in prefixes)
        p_ids, p_mask = self._padded(prefixes, p_len, left=True)
        p_positions = (p_mask.cumsum(-1) - 1).clamp(min=0)
        prefix_cache = None
        for c0, c1 in prefix_spans:
            first_logits, prefix_cache = self._forward(
                model, keep_ok, 1, input_ids=p_ids[:, c0:c1].to(device), attention_mask=p_mask[:, :c1].to(device),
                position_ids=p_positions[:, c0:c1].to(device), past_key_values=prefix_cache, use_cache=True)
        first_logits = first_logits[:, -1]
        last = max((b for b, chunks in enumerate(spans) if chunks), default=-1)  # the last piece using the cache
        for b, (sub, chunks) in enumerate(zip(pieces, spans, strict=True)):
            suffixes = [seqs[i][starts[i]:] for _, i in sub]
            parts = [[target_logprobs(first_logits[j: j + 1], x[:1], temperature)]  # scored by the prefix
                     for (j, _), x in zip(sub, suffixes, strict=True)]
            if chunks:  # up to batch_size suffixes of similar lengths on a copy of the prefixes
                owner = torch.tensor([j for j, _ in sub], device=device)
                cache = prefix_cache if b == last else copy.deepcopy(prefix_cache)
                cache.batch_select_indices(owner)
                s_len = max(len(x) for x in suffixes)
                s_ids, s_mask = self._padded(suffixes, s_len, left=False)
                mask = torch.cat([p_mask[owner.cpu()], s_mask], 1)
                positions = p_mask.sum(-1)[owner.cpu()][:, None] + torch.arange(s_len)[None, :]
                for c0, c1 in chunks:
                    logits, cache = self._forward(model, keep_ok, c1 - c0, input_ids=s_ids[:, c0:c1].to(device),
                                                  attention_mask=mask[:, : p_len + c1].to(device),
                                                  position_ids=positions[:, c0:c1].to(device), past_key_values=cache,
                                                  use_cache=True)
                    for r, x in enumerate(suffixes):  # positions c0 .. min(c1, n - 1) - 1 score tokens c0 + 1 ..
                        if (stop := min(c1, len(x) - 1)) > c0:
                            parts[r].append(target_logprobs(logits[r, : stop - c0], x[c0 + 1: stop + 1], temperature))
                    del logits
                del cache
            for r, (_, i) in enumerate(sub):
                out[i] = torch.cat(parts[r])
        del first_logits, prefix_cache

    def _padded(self, rows: list[list[int]], length: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            span = slice(length - len(row), length) if left else slice(0, len(row))
            input_ids[r, span] = torch.tensor(row, dtype=torch.long)
            mask[r, span] = 1
        return input_ids, mask
