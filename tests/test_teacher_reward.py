"""Tests for rlt.rewards.teacher.TeacherKLReward on the tiny model.

The student is the tiny model with fixed seed-perturbed weights, the teacher is the tiny model itself. Rewards are
checked against a slow, direct computation written here: one sequence at a time, the canonical tokenization of the
full texts, token spans from character positions (cumulative decode lengths), log_softmax(logits / tau), plain-Python
reductions (`statistics`), coefficients and penalties.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics

import pytest
import torch

from rlt.data.teacher import TeacherFormat, student_chat, teacher_rl_prompt
from rlt.errors import ConfigError
from rlt.rewards.teacher import TeacherKLReward
from rlt.rewards.teacher_math import length_buckets, reduce_values, schulman_k3, target_logprobs

FMT = TeacherFormat(teacher_system_prompt="Explain the solution.", student_system_prompt="Think, then answer.")
QUESTION, SOLUTION = "What is 2 plus 3?", "5"
CLOSE = "<|end_of_explanation|><|im_end|>"
BODIES = ["2 + 3 = 5.\n\n", "First add 2 and 3. The sum is 5.\n\n", "Two plus three is five.\n\n", "5\n\n"]
P = -1.0  # not_matched_penalty


@pytest.fixture(scope="module")
def setup(tiny_model_path):
    from rlt.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    teacher = load_model(tiny_model_path, torch_dtype="float32")
    student = load_model(tiny_model_path, torch_dtype="float32")
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    row = teacher_rl_prompt({"question": QUESTION, "solution": SOLUTION}, FMT, tok)
    return tok, teacher, student, row


# the teacher_rlt recipe's reward keys, which are the schema's defaults (test_defaults_are_the_published_runs)
RECIPE = dict(answer_log_prob_coeff=[1.0, 0.01], kl_penalty_reward_coeff=[3.0, 0.03],
              reduction_log_prob_fn=["mean", "min"], reduction_kl_fn=["mean", "max"], normalize_log_prob_fn=None,
              normalize_kl_fn=None, clip_log_prob=1e5, clip_kl=1e5, unbias_student_log_probs_temp=0.7)


def make_reward(setup, **kw):
    tok, teacher, student, _ = setup
    for key, value in {"teacher_format": FMT, **RECIPE}.items():
        kw.setdefault(key, value)
    return TeacherKLReward(student, tok, kw.pop("teacher_model", teacher), **kw)


def call(reward, setup, completion_texts, **kw):
    tok, _, _, row = setup
    n = len(completion_texts)
    completion_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completion_texts]
    return reward(prompts=[row["prompt"]] * n, completions=completion_texts, completion_ids=completion_ids,
                  question=[row["question"]] * n, solution=[row["solution"]] * n,
                  teacher_format=[row["teacher_format"]] * n, trainer_state=None, log_extra=None, **kw)


# ------------------------------------------------------------------------------------ the slow, direct reference


_FORWARDS: dict = {}  # (id(model), text) -> (ids, per-token char spans, float64 logits): each text runs once


def forward_once(model, tok, text):
    key = (id(model), text)
    if key not in _FORWARDS:
        ids = tok(text)["input_ids"]
        ends = [len(tok.decode(ids[: j + 1])) for j in range(len(ids))]  # cumulative decode lengths (ASCII text)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        _FORWARDS[key] = ids, list(zip([0, *ends[:-1]], ends, strict=True)), logits
    return _FORWARDS[key]


def span_logprobs(model, tok, text, lo, hi, tau):
    """log_softmax(logits / tau) of the tokens of `text` lying wholly inside characters [lo, hi)."""
    ids, spans, logits = forward_once(model, tok, text)
    span = [j for j, (a, b) in enumerate(spans) if a >= lo and b <= hi]
    assert span == list(range(span[0], span[-1] + 1)) if span else True
    logp = torch.log_softmax(logits / tau, dim=-1)
    return [ids[j] for j in span], [logp[j - 1, ids[j]].item() for j in span]


def reduce_py(values, name):
    if not values:
        return math.nan
    if name == "mean":
        return sum(values) / len(values)
    if name == "sum":
        return sum(values)
    if name in ("min", "max"):
        return min(values) if name == "min" else max(values)
    if name == "median":
        return statistics.median_low(values)  # the middle value; of an even count the lower one (torch.median)
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return quartiles[0] if name == "first_quartile" else quartiles[2]


def transform(values, norm, clip_low=None, clip_high=None):
    out = []
    for v in values:
        v = {"none": v, "exp": math.exp(v), "exp_norm": 1 - math.exp(-v)}[norm]
        v = max(v, clip_low) if clip_low is not None else v
        out.append(min(v, clip_high) if clip_high is not None else v)
    return out


def reference_terms(setup, body, *, a=(1.0, 0.01), b=(3.0, 0.03), red_lp=("mean", "min"), red_kl=("mean", "max"),
                    tau_s=0.7, tau_t=1.0, schulman=False, norm_lp="none", norm_kl="none", clip_lp=1e5, clip_kl=1e5,
                    entropy=True):
    """(log-prob term, KL term) for the explanation `body` (the text between the padding and the closing tag).

    The explanation span is the thought content (padding + body, rlt-spec §1.5): the tokens lying wholly inside it,
    in the student chat and in the teacher's prompt + body text."""
    tok, teacher, student, row = setup
    explanation = FMT.delimiters_padding + body
    s_text = student_chat(QUESTION, explanation, SOLUTION, FMT, tok)
    e_lo = s_text.index(FMT.think_open) + len(FMT.think_open)
    sol = FMT.pad(SOLUTION)
    sol_lo = s_text.rindex(FMT.solution_open + sol + FMT.solution_close) + len(FMT.solution_open)
    s_ids, s_k = span_logprobs(student, tok, s_text, e_lo, e_lo + len(explanation), tau_s)
    _, ell = span_logprobs(student, tok, s_text, sol_lo, sol_lo + len(sol), tau_s)
    t_text = row["prompt"] + body
    t_ids, q_k = span_logprobs(teacher, tok, t_text, len(row["prompt"]) - len(FMT.delimiters_padding), len(t_text),
                               tau_t)
    assert t_ids == s_ids  # both models score the same explanation tokens

    lp_vals = transform(ell, norm_lp, clip_low=-clip_lp if clip_lp is not None else None)
    lp_term = sum(c * reduce_py(lp_vals, r) for c, r in zip(a, red_lp, strict=True))
    d = [q - s for q, s in zip(q_k, s_k, strict=True)] if entropy else [-s for s in s_k]
    if schulman:
        d = [x + math.exp(-x) - 1 for x in d]
    kl_term = sum(c * reduce_py(transform(d, norm_kl, clip_high=clip_kl), r) for c, r in zip(b, red_kl, strict=True))
    return lp_term, kl_term


def reference_reward(setup, body, closed=True, **options):
    lp_term, kl_term = reference_terms(setup, body, **options)
    return lp_term - kl_term + (0.0 if closed else P)


# ------------------------------------------------------------------------------------------------------- values


CONFIGS = {
    "recipe": dict(reward=dict(temperature=0.7, unbias_student_log_probs_temp=0.7),
                   ref=dict(tau_s=0.7, tau_t=0.7)),
    "every_option": dict(
        reward=dict(answer_log_prob_coeff=[0.5, 2.0, 0.1], reduction_log_prob_fn=["median", "first_quartile", "sum"],
                    kl_penalty_reward_coeff=[1.0, 0.5, 0.2, 0.1],
                    reduction_kl_fn=["last_quartile", "min", "median", "sum"], use_schulman_kl_estimation=True,
                    normalize_kl_fn="exp_norm", clip_log_prob=8.0, clip_kl=0.02, temperature=0.5,
                    unbias_teacher_log_probs=False, unbias_student_log_probs_temp=1.3),
        ref=dict(a=(0.5, 2.0, 0.1), red_lp=("median", "first_quartile", "sum"), b=(1.0, 0.5, 0.2, 0.1),
                 red_kl=("last_quartile", "min", "median", "sum"), schulman=True, norm_kl="exp_norm", clip_lp=8.0,
                 clip_kl=0.02, tau_s=1.3, tau_t=1.0)),
    "exp_normalised": dict(reward=dict(normalize_log_prob_fn="exp", normalize_kl_fn="exp", temperature=0.9),
                           ref=dict(norm_lp="exp", norm_kl="exp", tau_t=0.9)),
    "no_entropy": dict(reward=dict(include_teacher_think_entropy=False), ref=dict(entropy=False)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_direct_computation(setup, name):
    cfg = CONFIGS[name]
    reward = make_reward(setup, teacher_reward_batch_size=3, **cfg["reward"])
    rewards = call(reward, setup, [body + CLOSE for body in BODIES] + [BODIES[0]])  # the last one is not closed
    expected = [reference_reward(setup, body, **cfg["ref"]) for body in BODIES]
    expected.append(reference_reward(setup, BODIES[0], closed=False, **cfg["ref"]))
    assert rewards == pytest.approx(expected, abs=2e-5)
    assert reward.last_terms["match_reward"] == [0.0] * len(BODIES) + [P]
    assert reward.last_terms["explanation_tokens"][:2] == [9.0, 16.0]  # the sampled body tokens, tag excluded


# ------------------------------------------------------------- the reference's own procedure, on decoded text


def _find_valid_subsequence(hay, needle, *, last=False):
    """rlt-spec §1.6: (start, length) of `needle` in `hay`, else of it without its first, last, or both tokens."""
    for cand in (needle, needle[1:], needle[:-1], needle[1:-1]):
        starts = range(len(hay) - len(cand), -1, -1) if last else range(len(hay) - len(cand) + 1)
        for s in starts if cand else ():
            if hay[s:s + len(cand)] == cand:
                return s, len(cand)
    return None


def reference_procedure(setup, prompt, completion_text, question, solution, tau_s=0.7, tau_t=0.7):
    """The reward as the reference computes it (rlt-spec §1.5, §1.6, §2; teacher_rlt coefficients), literally:
    decoded text, a regex for the explanation (closed if missing, with the penalty), the student chat and the
    teacher text re-tokenised whole, spans by token-subsequence search with its boundary trims (the thought content
    forward in both texts, the padded solution from the end), full forwards, left-aligned think spans."""
    import re

    tok, teacher, student, _ = setup
    opened = FMT.explanation_open + FMT.delimiters_padding  # masked_out_think_prefix, the end of the prompt
    pattern = re.compile(re.escape(FMT.explanation_open) + "(.*?)" + re.escape(FMT.explanation_close), re.DOTALL)
    completion, match = opened + completion_text, 0.0
    found = pattern.search(completion)
    if found is None:
        completion, match = completion + FMT.explanation_close, P
        found = pattern.search(completion)
    thought = found.group(1)  # includes the leading padding
    messages = [{"role": "system", "content": FMT.student_system_prompt}, {"role": "user", "content": question},
                {"role": "assistant", "content": FMT.think_prefix + FMT.think_open + thought + FMT.think_close
                 + FMT.think_solution_delimiter + FMT.solution_open + FMT.pad(solution) + FMT.solution_close}]
    s_ids = tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"]
    t_ids = tok(prompt[: -len(opened)] + completion)["input_ids"]

    def logprobs(model, ids, tau):  # lp[j] = log p(ids[j + 1])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
        return torch.log_softmax(logits / tau, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

    def span(lp, found):
        return lp[found[0] - 1: found[0] - 1 + found[1]]

    think = tok(thought, add_special_tokens=False)["input_ids"]
    s_lp, t_lp = logprobs(student, s_ids, tau_s), logprobs(teacher, t_ids, tau_t)
    ell = span(s_lp, _find_valid_subsequence(s_ids, tok(FMT.pad(solution), add_special_tokens=False)["input_ids"],
                                             last=True))
    s_k = span(s_lp, _find_valid_subsequence(s_ids, think))
    q_k = span(t_lp, _find_valid_subsequence(t_ids, think, last=True))
    d = [q - s for q, s in zip(q_k, s_k, strict=False)]
    return (statistics.mean(ell) + 0.01 * min(ell)) - 3.0 * (statistics.mean(d) + 0.01 * max(d)) + match


NATURAL = [  # worded explanations as a trained teacher writes them (GSM8K-style), closed or not
    "Janet has 16 eggs. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 are left.\n\nShe sells each for $2: "
    "9 * 2 = 18 dollars.\n\n<|end_of_explanation|><|im_end|>",
    "First, find half of 2 bolts: 2 / 2 = 1.\n\nThen add it: 2 + 1 = 3 bolts in total.<|end_of_explanation|>",
    "The price rose by 150%, i.e. 80,000 * 1.5 = 120,000; the house is now worth 200,000.",
    "Let x be the number of cups. Then 3x + 2 = 20, so x = 6.\n\n",
]


def test_matches_the_reference_procedure_on_decoded_text(setup):
    """On worded explanations, with a tokenizer whose pre-tokenizer keeps the blank line with the tag before it
    (Qwen2's regex, as `rlt:tiny`), our spans (from token ids and character offsets) and the reference's
    (re-tokenised text, subsequence search with trims) are the same tokens: rewards equal within float error, whether
    the reward gets the token ids or only the decoded text (docs/rlt.md: GPT-2-style tokenizers differ)."""
    tok, _, _, row = setup
    reward = make_reward(setup, teacher_reward_batch_size=2, temperature=0.7, unbias_student_log_probs_temp=0.7)
    n = len(NATURAL)
    kw = dict(prompts=[row["prompt"]] * n, question=[row["question"]] * n, solution=[row["solution"]] * n,
              teacher_format=[row["teacher_format"]] * n)
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in NATURAL]
    decoded = [tok.decode(i, skip_special_tokens=True) for i in ids]
    expected = [reference_procedure(setup, row["prompt"], text, QUESTION, SOLUTION) for text in decoded]
    assert reward(completion_ids=ids, completions=decoded, **kw) == pytest.approx(expected, abs=2e-5)
    assert reward(completions=decoded, **kw) == pytest.approx(expected, abs=2e-5)
    assert reward.last_terms["match_reward"] == [0.0, 0.0, P, P]


def test_solution_and_explanation_spans(setup):
    tok = setup[0]
    reward = make_reward(setup)
    ids = tok(BODIES[1] + CLOSE, add_special_tokens=False)["input_ids"]
    body, leftover, closed, _ = reward._split_explanation(ids[:-1])  # eos stripped, as __call__ does
    assert tok.decode(body) == BODIES[1] and leftover == "" and closed
    tail = "<|end_of_thought|>\n\n<|begin_of_solution|>\n\n5\n\n<|end_of_solution|><|im_end|>\n"
    tail_ids, lo, hi = reward._solution_span(tail, SOLUTION)
    # '|>\n' belongs to the open tag, so the span is the rest of the padded solution
    assert [tok.decode([t]) for t in tail_ids[lo:hi]] == ["\n", "5", "\n", "\n"]


def test_token_straddling_the_closing_tag(setup):
    """A sampled token holding body text and the start of the tag ('.<|') is left out of the body; its body text
    is re-tokenised on the student side as leftover text."""
    tok = copy.deepcopy(setup[0])
    tok.add_tokens([".<|"])
    reward = make_reward(setup)
    reward.tokenizer = tok
    ids = tok("Sum is 5.<|end_of_explanation|>", add_special_tokens=False)["input_ids"]
    assert ".<|" in [tok.decode([t]) for t in ids]
    body, leftover, closed, text = reward._split_explanation(ids)
    assert tok.decode(body) == "Sum is 5" and leftover == "." and closed and text == "Sum is 5."
    body, leftover, closed, _ = reward._split_explanation(tok("Sum is 5.<|end_of_expl", add_special_tokens=False)
                                                       ["input_ids"])
    assert tok.decode(body) == "Sum is 5.<|end_of_expl" and leftover == "" and not closed


def test_malformed_completions_get_the_penalty(setup):
    tok = setup[0]
    reward = make_reward(setup)
    texts = ["no closing tag here", "<|im_end|>", "<|end_of_explanation|><|im_end|>",
             "  \n\n<|end_of_explanation|><|im_end|>", "\n\n \n<|end_of_explanation|>", "", "Sum.<|end_of_explanation"]
    rewards = call(reward, setup, texts)
    terms = reward.last_terms
    assert all(math.isfinite(r) for r in rewards)
    assert terms["unclosed"] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert terms["blank"] == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert terms["match_reward"] == [P, 2 * P, P, P, P, 2 * P, P]
    for i, r in enumerate(rewards):  # blank explanations: no KL term, the blank penalty instead
        if terms["blank"][i]:
            assert terms["kl_term"][i] == 0.0 and terms["no_entropy_kl_term"][i] == 0.0
        assert r == pytest.approx(terms["log_prob_term"][i] - terms["kl_term"][i] + terms["match_reward"][i])
    # an unclosed explanation is closed for scoring: same value as the reference with the tag appended
    assert rewards[0] == pytest.approx(reference_reward(setup, "no closing tag here", closed=False), abs=2e-5)
    # nothing but eos: an empty explanation, unclosed and blank; the solution is still scored after it
    assert rewards[1] == pytest.approx(reference_terms(setup, "")[0] + 2 * P, abs=2e-5)
    # an empty solution span (empty solution) gives the log-prob term the penalty
    empty = reward(prompts=[setup[3]["prompt"]], completion_ids=[tok(BODIES[0] + CLOSE)["input_ids"]],
                   question=[QUESTION], solution=[""])
    # each reduction of the empty span is filled with p, then weighed: p * (1 + 0.01)
    assert reward.last_terms["log_prob_term"] == pytest.approx([P * 1.01]) and math.isfinite(empty[0])


def test_batched_equals_unbatched(setup):
    texts = [b + CLOSE for b in BODIES] + ["x" * 3 + " and more words to make it longer. " * 4 + CLOSE, "short"]
    single = make_reward(setup, teacher_reward_batch_size=1, temperature=0.7)
    batched = make_reward(setup, teacher_reward_batch_size=5, temperature=0.7)
    r1, r2 = call(single, setup, texts), call(batched, setup, texts)
    assert max(abs(x - y) for x, y in zip(r1, r2, strict=True)) <= 1e-5
    for key, values in single.last_terms.items():
        for x, y in zip(values, batched.last_terms[key], strict=True):
            assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-5 * max(1.0, abs(x)), key  # sums: float32


# ------------------------------------------------------------------------------------------------- coefficients


def test_scalar_and_list_coefficients(setup):
    texts = [b + CLOSE for b in BODIES]
    scalar = call(make_reward(setup, answer_log_prob_coeff=2.0, kl_penalty_reward_coeff=0.5), setup, texts)
    listed = call(make_reward(setup, answer_log_prob_coeff=[2.0, 2.0], kl_penalty_reward_coeff=[0.5, 0.5]), setup,
                  texts)
    assert scalar == pytest.approx(listed, abs=1e-9)
    negative = make_reward(setup, kl_penalty_reward_coeff=-0.5)  # allowed (rewards divergence), must not crash
    assert call(negative, setup, texts) == pytest.approx(
        call(make_reward(setup, kl_penalty_reward_coeff=[-0.5, -0.5]), setup, texts), abs=1e-9)
    assert call(make_reward(setup, reduction_log_prob_fn="mean", answer_log_prob_coeff=[1.0]), setup, texts) == \
        pytest.approx([reference_reward(setup, b, a=(1.0,), red_lp=("mean",)) for b in BODIES], abs=2e-5)
    with pytest.raises(ConfigError, match="paired elementwise"):
        make_reward(setup, answer_log_prob_coeff=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="must be > 0"):
        make_reward(setup, answer_log_prob_coeff=-1.0)
    with pytest.raises(ConfigError, match="reduction_kl_fn='p90' is not one of"):
        make_reward(setup, reduction_kl_fn=["mean", "p90"])
    with pytest.raises(ConfigError, match=r"kl_penalty_reward_coef: not a teacher reward key \(did you mean"):
        make_reward(setup, kl_penalty_reward_coef=1.0)
    with pytest.raises(ConfigError, match="normalize_kl_fn"):
        make_reward(setup, normalize_kl_fn="softmax")


class ForwardCounter:
    def __init__(self, *models):
        self.count = [0] * len(models)
        self.hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(models)]

    def _hook(self, i):
        def hook(*_):
            self.count[i] += 1
        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()


@pytest.mark.parametrize("coeff", [0, [0.0, 0.0]])
def test_zero_kl_coefficient_skips_the_teacher_forward(setup, coeff):
    tok, teacher, student, _ = setup
    texts = [b + CLOSE for b in BODIES]
    expected = [reference_reward(setup, b, b=(0.0, 0.0)) for b in BODIES]
    counter = ForwardCounter(teacher, student)
    try:
        no_teacher = TeacherKLReward(student, tok, None, teacher_format=FMT,
                                     **{**RECIPE, "kl_penalty_reward_coeff": coeff}, teacher_reward_batch_size=2)
        rewards = call(no_teacher, setup, texts)
    finally:
        counter.remove()
    # no teacher forward; 4 completions of one prompt, batch 2: the shared prefix once, then its suffixes 2 at a
    # time -> 3 student forwards
    assert counter.count == [0, 3]
    assert no_teacher.last_terms["kl_term"] == [0.0] * 4
    assert rewards == pytest.approx(expected, abs=2e-5)


def test_one_forward_per_batch_and_model(setup):
    teacher, student = setup[1], setup[2]
    texts = [b + CLOSE for b in BODIES]
    counter = ForwardCounter(teacher, student)
    try:
        call(make_reward(setup, teacher_reward_batch_size=4, share_prefixes=False), setup, texts)
        assert counter.count == [1, 1]
        call(make_reward(setup, teacher_reward_batch_size=4, include_teacher_think_entropy=False,
                         share_prefixes=False), setup,
             texts)
        assert counter.count == [1, 2]  # the no-entropy reward needs no teacher
        call(make_reward(setup, teacher_reward_batch_size=4), setup, texts)
        assert counter.count == [3, 4]  # shared prefix: the prompt once, then the 4 suffixes on its cache
    finally:
        counter.remove()


def test_shared_prefixes_equal_whole_sequences(setup):
    """Two prompts x several completions, mixed lengths, micro-batches that split a group and mix groups: the
    prefix-cached scores equal whole-sequence scores (and batch 1) within float error."""
    tok, teacher, student, row = setup
    other = teacher_rl_prompt({"question": "What is 7 minus 4?", "solution": "3"}, FMT, tok)
    texts = [b + CLOSE for b in BODIES] + [BODIES[1], "", BODIES[2] + CLOSE]
    rows = [row] * 4 + [other] * 3
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def score(**kw):
        reward = make_reward(setup, temperature=0.7, unbias_student_log_probs_temp=0.7, **kw)
        out = reward(prompts=[r["prompt"] for r in rows], completions=texts, completion_ids=ids,
                     question=[r["question"] for r in rows], solution=[r["solution"] for r in rows],
                     teacher_format=[r["teacher_format"] for r in rows])
        return out, reward.last_terms

    whole, whole_terms = score(teacher_reward_batch_size=1)
    counter = ForwardCounter(teacher, student)
    try:
        score(teacher_reward_batch_size=16)
    finally:
        counter.remove()
    assert counter.count == [2, 2]  # both prompt groups in one micro-batch: the prefixes, then all suffixes
    chunked = ForwardCounter(teacher, student)
    try:  # at most 7 positions per forward: the 2-row prefix 3 at a time, suffix pieces of 4+ rows 1 at a time
        score(teacher_reward_batch_size=16, teacher_reward_tokens_per_forward=7)
    finally:
        chunked.remove()
    assert chunked.count[0] > 2 and chunked.count[1] > 2
    for kw in (dict(teacher_reward_batch_size=3), dict(teacher_reward_batch_size=5),
               dict(teacher_reward_batch_size=16), dict(teacher_reward_batch_size=16, share_prefixes=False),
               # bounded forwards: prefixes, suffix pieces, whole sequences in position chunks on the KV cache
               dict(teacher_reward_batch_size=5, teacher_reward_tokens_per_forward=7),
               dict(teacher_reward_batch_size=2, teacher_reward_tokens_per_forward=9),
               dict(teacher_reward_batch_size=4, share_prefixes=False, teacher_reward_tokens_per_forward=10),
               dict(teacher_reward_batch_size=1, teacher_reward_tokens_per_forward=3)):
        shared, terms = score(**kw)
        assert shared == pytest.approx(whole, abs=1e-5), kw
        for key in ("log_prob_term", "kl_term", "teacher_think_log_prob_mean", "student_think_log_prob_mean"):
            assert terms[key] == pytest.approx(whole_terms[key], abs=1e-5, nan_ok=True), (kw, key)


def test_tokens_per_forward_bounds_every_scoring_forward(setup):
    """With teacher_reward_tokens_per_forward=10 and batches of up to 4 rows, no forward of either model gets more
    than 10 input positions (rows × positions), prefixes included, and the rewards equal the unbounded ones."""
    tok, teacher, student, _ = setup
    texts = [b + CLOSE for b in BODIES] + [BODIES[1] * 3, BODIES[2] + CLOSE]
    sizes: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, kw: sizes.append(kw["input_ids"].numel()), with_kwargs=True)
             for m in (teacher, student)]
    try:
        for share in (True, False):
            unbounded = call(make_reward(setup, teacher_reward_batch_size=4, share_prefixes=share), setup, texts)
            assert max(sizes) > 10
            sizes.clear()
            bounded = call(make_reward(setup, teacher_reward_batch_size=4, teacher_reward_tokens_per_forward=10,
                                       share_prefixes=share), setup, texts)
            assert sizes and max(sizes) <= 10, (share, sizes)
            sizes.clear()
            assert bounded == pytest.approx(unbounded, abs=1e-5)
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ConfigError, match="teacher_reward_tokens_per_forward=0 must be an integer >= 1"):
        make_reward(setup, teacher_reward_tokens_per_forward=0)


def test_missing_teacher_and_format_mismatch(setup):
    tok, _, student, row = setup
    reward = TeacherKLReward(student, tok, teacher_format=FMT, **RECIPE)
    with pytest.raises(ConfigError, match="set_teacher_model"):
        call(reward, setup, [BODIES[0] + CLOSE])
    reward.set_teacher_model(setup[1])
    assert call(reward, setup, [BODIES[0] + CLOSE]) == pytest.approx([reference_reward(setup, BODIES[0])], abs=2e-5)
    with pytest.raises(ConfigError, match="teacher format"):
        reward(prompts=[row["prompt"]], completion_ids=[[1, 2]], question=[QUESTION], solution=[SOLUTION],
               teacher_format=[TeacherFormat.r1().fingerprint])
    with pytest.raises(ConfigError, match="'question' and 'solution'"):
        reward(prompts=[row["prompt"]], completion_ids=[[1, 2]])


def _sampling_logprobs(setup, texts, tau):
    """What the trainer passes from vLLM: one log-prob per sampled token (body from the teacher, the rest 0)."""
    tok, teacher, _, row = setup
    out = []
    for body, text in zip(BODIES, texts, strict=True):
        _, q_k = span_logprobs(teacher, tok, row["prompt"] + body, len(row["prompt"]), len(row["prompt"] + body), tau)
        out.append(q_k + [0.0] * (len(tok(text, add_special_tokens=False)["input_ids"]) - len(q_k)))
    return out


def test_generator_sampling_logprobs_are_reused_row_by_row(setup):
    """`rlt.trainers.GRPOTrainer` passes `sampling_logprobs` + `sampling_temperature`: at tau_T they replace the
    teacher forward (same rewards) but for one prefill of the prompt, which scores the padding token that opens the
    explanation span; a row without them, or another temperature, or reuse off, is scored by the forward (one forward
    per call here: batch 8, no prefix sharing)."""
    teacher = setup[1]
    texts = [b + CLOSE for b in BODIES]
    expected = [reference_reward(setup, b, tau_t=0.7) for b in BODIES]
    given = _sampling_logprobs(setup, texts, 0.7)
    counter = ForwardCounter(teacher)
    try:
        # 1 forward per call
        reward = make_reward(setup, temperature=0.7, teacher_reward_batch_size=8, share_prefixes=False)
        rewards = call(reward, setup, texts, sampling_logprobs=given, sampling_temperature=[0.7] * 4)
        assert counter.count == [1] and reward.last_reused_sampling_logprobs == 4  # the prompt's prefill only
        assert rewards == pytest.approx(expected, abs=2e-5)

        partial = [given[0], None, given[2][:3], [None] + given[3][1:]]  # missing, too short, a None value
        assert call(reward, setup, texts, sampling_logprobs=partial, sampling_temperature=0.7) == pytest.approx(
            expected, abs=2e-5)
        assert counter.count == [2] and reward.last_reused_sampling_logprobs == 1  # 3 rows + the prefill: 1 forward

        call(reward, setup, texts, sampling_logprobs=given, sampling_temperature=[1.0] * 4)  # not tau_T
        assert counter.count == [3] and reward.last_reused_sampling_logprobs == 0
        off = make_reward(setup, temperature=0.7, teacher_reuse_sampling_logprobs=False, share_prefixes=False)
        assert call(off, setup, texts, sampling_logprobs=given, sampling_temperature=0.7) == pytest.approx(
            expected, abs=2e-5)
        assert counter.count == [4] and off.last_reused_sampling_logprobs == 0
    finally:
        counter.remove()


# ------------------------------------------------------------------------------------------- logging / devices


def test_logging_and_name(setup):
    logged = {}
    reward = make_reward(setup)
    rewards = call(reward, setup, [b + CLOSE for b in BODIES] + ["<|end_of_explanation|>"],
                   log_metric=lambda name, value: logged.__setitem__(name, value))
    assert reward.__name__ == "teacher_kl"
    assert logged["teacher_kl/reward"] == pytest.approx(sum(rewards) / len(rewards))
    for name in ("log_prob_term", "kl_term", "match_reward", "no_entropy_kl_term", "no_entropy_reward", "kl_mean",
                 "kl_max", "log_prob_mean", "log_prob_min", "no_entropy_kl_mean", "unclosed", "blank"):
        assert f"teacher_kl/{name}" in logged, name
    assert logged["teacher_kl/kl_mean"] == pytest.approx(sum(reward.last_terms["kl_mean"][:4]) / 4)  # NaN skipped
    terms = reward.last_terms  # the unprocessed statistics, as the reference logs them (identity normalisation here)
    for prefix in ("log_prob_raw_", "kl_raw_", "no_entropy_kl_raw_"):
        for stat in ("mean", "sum", "min", "max", "median", "first_quartile", "last_quartile"):
            assert f"teacher_kl/{prefix}{stat}" in logged, prefix + stat
    assert terms["kl_raw_mean"][:4] == pytest.approx(terms["kl_mean"][:4])
    assert terms["kl_raw_max"][:4] == pytest.approx(terms["kl_max"][:4])
    assert terms["log_prob_raw_min"][:4] == pytest.approx(terms["log_prob_min"][:4])
    for i in range(4):
        assert terms["kl_raw_min"][i] <= terms["kl_raw_first_quartile"][i] <= terms["kl_raw_median"][i] \
            <= terms["kl_raw_last_quartile"][i] <= terms["kl_raw_max"][i]
    assert all(len(v) == 5 for v in reward.last_terms.values())


def test_offloading_moves_the_student_only_for_the_call(setup):
    tok, teacher, student, _ = setup
    moves = []
    original_to = student.to

    def spy(*args, **kwargs):
        moves.append(str(args[0]))
        return original_to(*args, **kwargs)

    student.to = spy
    try:
        scoring = torch.device("cpu", 0)  # a device != the student's ("cpu") on a CPU-only machine
        reward = TeacherKLReward(student, tok, teacher, teacher_format=FMT, offload_untrained_models=True,
                                 device=scoring)
        assert moves == ["cpu"]
        call(reward, setup, [BODIES[0] + CLOSE])
        assert moves == ["cpu", "cpu:0", "cpu"]
        assert all(p.device.type == "cpu" for p in student.parameters())
        assert not any(p.requires_grad for p in student.parameters()) and not student.training
    finally:
        del student.to


def test_explanation_without_a_body_token(setup):
    """A sampled token fusing the whole explanation with the start of the tag ('.<|', see the straddling test) leaves
    explanation text '.' (not blank) with no body token. The explanation span still holds the padding token that
    opens it, so the KL is that token's (the direct computation of an empty body: the student's log-prob of the
    padding depends on the chat before it only). Without padding the span is empty: each KL reduction is NaN and
    filled with -p = +1 before the coefficients weigh it (rlt-spec §2), KL term = 3 + 0.03, never NaN.
    (The split is simulated: a tokenizer with '.<|' added would need a resized model.)"""
    tok = setup[0]
    ids = tok(".<|end_of_explanation|>", add_special_tokens=False)["input_ids"]
    unpadded = dataclasses.replace(FMT, delimiters_padding="")
    for fmt in (FMT, unpadded):
        prompt = teacher_rl_prompt({"question": QUESTION, "solution": SOLUTION}, fmt, tok)["prompt"]
        for include in (True, False):
            reward = make_reward(setup, include_teacher_think_entropy=include, teacher_format=fmt)
            reward._split_explanation = lambda _ids: ([], ".", True, ".")
            rewards = reward(prompts=[prompt], completions=[".<|end_of_explanation|>"], completion_ids=[ids],
                             question=[QUESTION], solution=[SOLUTION])
            terms = reward.last_terms
            assert terms["blank"] == [0.0] and math.isfinite(rewards[0])
            if fmt is FMT:
                assert terms["no_entropy_kl_term"] == pytest.approx([reference_terms(setup, "", entropy=False)[1]])
                if include:
                    assert terms["kl_term"] == pytest.approx([reference_terms(setup, "")[1]], abs=2e-5)
            else:
                assert terms["no_entropy_kl_term"] == pytest.approx([-P * 3.03])
                if include:
                    assert terms["kl_term"] == pytest.approx([-P * 3.03])
            kl = terms["kl_term" if include else "no_entropy_kl_term"][0]
            assert rewards[0] == pytest.approx(terms["log_prob_term"][0] - kl)


def test_reductions_by_hand():
    """The `reduce_values` docstring's example: sorted 1, 2, 3, 4 -> mean 2.5, sum 10, min 1, max 4, lower median 2
    (as torch.median and the reference's nanmedian), quartiles by linear interpolation at ranks 0.75 and 2.25:
    1 + 0.75 * (2 - 1) = 1.75 and 3 + 0.25 * (4 - 3) = 3.25; an empty span is NaN."""
    x = torch.tensor([4.0, 1.0, 3.0, 2.0])
    names = ("mean", "sum", "min", "max", "median", "first_quartile", "last_quartile")
    assert [reduce_values(x, n) for n in names] == [2.5, 10.0, 1.0, 4.0, 2.0, 1.75, 3.25]
    assert reduce_values(torch.tensor([5.0, 1.0, 3.0]), "median") == 3.0
    assert math.isnan(reduce_values(torch.empty(0), "max"))


def test_defaults_are_the_published_runs(setup):
    """Unset keys take the schema's defaults (`rlt.config.TeacherRewardSection`), the published teacher_rlt run's
    values; the reference class's own defaults (a = b = 1, mean, exp / exp_norm, no clipping, tau_S 1), which no
    published run used, give its numbers when set. A scalar log-prob coefficient <= 0 raises, as there."""
    from rlt.config import TeacherRewardSection

    tok, teacher, student, _ = setup
    assert {k: getattr(TeacherRewardSection(), k) for k in RECIPE} == RECIPE
    texts = [b + CLOSE for b in BODIES]
    published = TeacherKLReward(student, tok, teacher, teacher_format=FMT, temperature=0.7)
    expected = [reference_reward(setup, b, tau_s=0.7, tau_t=0.7) for b in BODIES]
    assert call(published, setup, texts) == pytest.approx(expected, abs=2e-5)
    reference_class = TeacherKLReward(student, tok, teacher, teacher_format=FMT, answer_log_prob_coeff=1.0,
                                      kl_penalty_reward_coeff=1.0, reduction_log_prob_fn="mean",
                                      reduction_kl_fn="mean", normalize_log_prob_fn="exp", normalize_kl_fn="exp_norm",
                                      clip_log_prob=None, clip_kl=None, unbias_student_log_probs_temp=None)
    expected = [reference_reward(setup, b, a=(1.0,), b=(1.0,), red_lp=("mean",), red_kl=("mean",), norm_lp="exp",
                                 norm_kl="exp_norm", clip_lp=None, clip_kl=None, tau_s=1.0) for b in BODIES]
    assert call(reference_class, setup, texts) == pytest.approx(expected, abs=2e-5)
    for bad in (0, 0.0, -1.0):
        with pytest.raises(ConfigError, match="answer_log_prob_coeff=.* must be > 0 as a scalar"):
            TeacherKLReward(student, tok, teacher, teacher_format=FMT, answer_log_prob_coeff=bad)
    TeacherKLReward(student, tok, teacher, teacher_format=FMT, answer_log_prob_coeff=[0.0, 0.0])  # a deliberate off


def test_length_buckets_by_hand():
    """The `length_buckets` docstring's example (slack 64), worked there. With the default slack of 256 tokens:
    128, 112, 96 as there; +64: 512 padded for 400 real, 112 wasted <= 256, joins; +48: 640 for 448, 192 wasted,
    joins; +32: 768 for 480 (x1.6, 288 wasted): new bucket; 32+24: 64 for 56 joins; +16: 96 for 72, joins."""
    lengths = [128, 112, 96, 64, 48, 32, 24, 16]
    assert length_buckets(lengths, slack=64) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert length_buckets(lengths) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert length_buckets([]) == [] and length_buckets([7]) == [[0]]
    assert length_buckets([10, 10, 10], max_padding=1.0, slack=0) == [[0, 1, 2]]  # equal lengths never split


def test_k3_and_tempered_target_logprobs_by_hand():
    """k3(d) = d + e^-d - 1: 0 at d = 0, ln2 - 1/2 at ln2, 1 - ln2 at -ln2; log_softmax((0, ln3) / T)[1]:
    ln(3/4) at T = 1, ln(9/10) at T = 0.5 (logits (0, 2 ln3) -> weights 1 : 9), row t scoring targets[t]."""
    d = torch.tensor([0.0, math.log(2.0), -math.log(2.0)])
    assert schulman_k3(d).tolist() == pytest.approx([0.0, math.log(2.0) - 0.5, 1.0 - math.log(2.0)], abs=1e-7)
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    assert target_logprobs(logits, [1, 1], 1.0).tolist() == pytest.approx([math.log(0.75), math.log(0.25)])
    assert target_logprobs(logits[:1], [1], 0.5).tolist() == pytest.approx([math.log(0.9)])


def test_docstring_examples_of_the_pure_functions_hold():
    """The worked examples in the docstrings of the pure helpers are executed (they are the hand-worked values)."""
    import doctest
    import importlib

    for name in ("rlt.rewards.teacher_math", "rlt.config.checks", "rlt.config.grpo", "rlt.config.rlt", "rlt.models",
                 "rlt.generation.sampling", "rlt.cli", "rlt.run_dir", "rlt.rewards.gsm8k"):
        result = doctest.testmod(importlib.import_module(name))
        assert result.failed == 0 and result.attempted > 0, (name, result)


def test_zero3_ranks_run_as_many_forwards(setup, monkeypatch):
    """A ZeRO-3-partitioned model gathers its weights collectively in every forward: each rank's reward must run as
    many forwards as the busiest rank's, or the run hangs. Simulated on one process: the parameters carry
    DeepSpeed's ``ds_id`` tag and the all-reduce reports a rank with 2 forwards more; this rank then runs 2 one-token
    forwards after its own, also when it has nothing to score with that model (every explanation blank)."""
    tok, teacher, student, _ = setup
    teacher = copy.deepcopy(teacher)
    for param in teacher.parameters():
        param.ds_id = 0
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: t.add_(2))
    reward = make_reward(setup, teacher_model=teacher, teacher_reward_batch_size=4)
    counter = ForwardCounter(teacher, student)
    try:
        rewards = call(reward, setup, [b + CLOSE for b in BODIES])
        assert counter.count == [2 + 2, 2]  # own: the prompt prefix, then one piece of the 4 suffixes; +2 dummies
        call(reward, setup, ["<|end_of_explanation|><|im_end|>"] * 2)  # blank: no teacher row on this rank
        assert counter.count[0] == 4 + 0 + 2
    finally:
        counter.remove()
    assert rewards == pytest.approx(call(make_reward(setup, teacher_reward_batch_size=4), setup,
                                         [b + CLOSE for b in BODIES]),
                                    abs=1e-6)
