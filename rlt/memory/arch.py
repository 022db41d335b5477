"""A decoder's shape (`ModelArch`), its parameter counts, LoRA sizes, and the bundled table of common models."""

from __future__ import annotations

import re
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class ModelArch:
    """The few numbers of a decoder-only transformer that memory depends on (a Llama/Qwen2-style block).

    `attention_layers` < `num_layers` describes hybrids like LFM2, whose other layers are gated short convolutions
    (in_proj h→3h, out_proj h→h, a depth-wise kernel of `conv_kernel` taps) and hold no KV cache.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v
    qk_norm: bool = False  # LFM2 / Qwen3 normalise q and k per head
    attention_layers: int | None = None  # None = every layer is attention
    conv_kernel: int = 0
    checkpoint_dtype: str | None = None  # what torch_dtype=auto loads (config.json `torch_dtype`/`dtype`)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def n_attention_layers(self) -> int:
        return self.num_layers if self.attention_layers is None else self.attention_layers

    def linear_shapes(self, kind: str = "attention") -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one block, by its Llama/Qwen2 module name."""
        h, i = self.hidden_size, self.intermediate_size
        mlp = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        if kind == "conv":
            return {"in_proj": (h, 3 * h), "out_proj": (h, h), **mlp}
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), **mlp}


# Other names of the same modules (LFM2: w1/w3/w2 = gate/up/down, out_proj = o_proj in attention blocks).
MODULE_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "dense": "o_proj"}


def param_count(arch: ModelArch) -> int:
    """Total parameters, tied embeddings counted once (what `model.num_parameters()` reports).

    embed V·h (+ lm_head V·h if untied) + per attention layer [q,o: 2·h·q; k,v: 2·h·kv; q/k/v biases; q/k norms;
    gated MLP 3·h·i; 2 RMSNorms 2·h] + per conv layer [4·h² + h·kernel + 3·h·i + 2·h] + final norm h.

    Example, Qwen2.5-7B (h 3584, 28 layers, q 3584, kv 512, i 18944, V 152064, untied, qkv bias):
    layer = 2·3584·3584 + 2·3584·512 + (3584+1024) + 3·3584·18944 + 2·3584 = 233,057,792;
    total = 28 × 233,057,792 + 2 × 152064·3584 + 3584 = 7,615,616,512 (model card: 7.61B).
    """
    h, q, kv = arch.hidden_size, arch.q_dim, arch.kv_dim
    mlp = 3 * h * arch.intermediate_size
    attn = 2 * h * q + 2 * h * kv + (q + 2 * kv if arch.qkv_bias else 0) + (2 * arch.head_dim if arch.qk_norm else 0)
    conv = h * 3 * h + h * h + h * arch.conv_kernel
    n_attn = arch.n_attention_layers
    layers = n_attn * (attn + mlp + 2 * h) + (arch.num_layers - n_attn) * (conv + mlp + 2 * h)
    embeddings = arch.vocab_size * h * (1 if arch.tie_embeddings else 2)
    return embeddings + layers + h


def embedding_param_count(arch: ModelArch) -> int:
    """Parameters of the input embedding and (if untied) the LM head: V·h·(1 or 2)."""
    return arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)


def largest_layer_params(arch: ModelArch) -> int:
    """The largest single module's own parameters (DeepSpeed ZeRO-3's `largest_layer_params`, `recurse=False`).

    Almost always the embedding (or LM head): Qwen2.5-7B: 152064 × 3584 = 544,997,376.
    """
    shapes = [a * b for kind in ("attention", "conv") for a, b in arch.linear_shapes(kind).values()]
    return max([arch.vocab_size * arch.hidden_size, *shapes])


def lora_targets(arch: ModelArch, target_modules: tuple[str, ...] | list[str]) -> dict[str, set[str]]:
    """Which linear modules of an attention / conv block LoRA wraps (peft's `all-linear` = all but the LM head)."""
    out: dict[str, set[str]] = {}
    for kind in ("attention", "conv"):
        names = set(arch.linear_shapes(kind))
        if "all-linear" in target_modules:
            out[kind] = names
        else:
            wanted = {MODULE_ALIASES.get(m, m) for m in target_modules}
            if kind == "conv" and "out_proj" in target_modules:
                wanted.add("out_proj")
            out[kind] = names & wanted
    return out


def unknown_lora_modules(arch: ModelArch, target_modules: tuple[str, ...] | list[str]) -> list[str]:
    """Target module names that match no linear layer of `arch` (they would add no adapter)."""
    known = {*arch.linear_shapes("attention"), *arch.linear_shapes("conv"), *MODULE_ALIASES, "all-linear"}
    return [m for m in target_modules if m not in known]


def lora_param_count(arch: ModelArch, r: int, target_modules: tuple[str, ...] | list[str] = ("all-linear",)) -> int:
    """Trainable LoRA parameters: Σ over wrapped linears of r·(in + out) (A is r×in, B is out×r).

    Example, Qwen2.5-7B, r=16, all-linear: per layer 16·[(3584+3584)·2 + (3584+512)·2 + (3584+18944)·3]
    = 16·(14336 + 8192 + 67584) = 1,441,792; × 28 layers = 40,370,176 (0.53% of 7.6B).
    """
    targets = lora_targets(arch, target_modules)
    n_attn = arch.n_attention_layers
    total = 0
    for kind, layers in (("attention", n_attn), ("conv", arch.num_layers - n_attn)):
        shapes = arch.linear_shapes(kind)
        total += layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in targets[kind])
    return total



# ----------------------------------------------------------------------------------------------- architectures

def _arch(name, h, layers, heads, kv, head_dim, inter, vocab, tied, **kw) -> ModelArch:
    return ModelArch(name, h, layers, heads, kv, head_dim, inter, vocab, tied, checkpoint_dtype="bfloat16", **kw)


# Published config.json values; `param_count` of each reproduces the published total (tests/test_memory.py).
BUNDLED_ARCHS: dict[str, ModelArch] = {a.name: a for a in (
    _arch("Qwen2.5-0.5B", 896, 24, 14, 2, 64, 4864, 151936, True, qkv_bias=True),
    _arch("Qwen2.5-1.5B", 1536, 28, 12, 2, 128, 8960, 151936, True, qkv_bias=True),
    _arch("Qwen2.5-3B", 2048, 36, 16, 2, 128, 11008, 151936, True, qkv_bias=True),
    _arch("Qwen2.5-7B", 3584, 28, 28, 4, 128, 18944, 152064, False, qkv_bias=True),
    _arch("Qwen2.5-14B", 5120, 48, 40, 8, 128, 13824, 152064, False, qkv_bias=True),
    _arch("Qwen2.5-32B", 5120, 64, 40, 8, 128, 27648, 152064, False, qkv_bias=True),
    _arch("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256, False),
    _arch("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192, 128256, True),
    _arch("Llama-3.2-1B", 2048, 16, 32, 8, 64, 8192, 128256, True),
    _arch("SmolLM2-135M", 576, 30, 9, 3, 64, 1536, 49152, True),
    _arch("SmolLM2-360M", 960, 32, 15, 5, 64, 2560, 49152, True),
    _arch("SmolLM2-1.7B", 2048, 24, 32, 32, 64, 8192, 49152, True),
    # LFM2: 6 attention + 10 short-conv layers; the FFN width is the auto-adjusted 2/3·6656 → multiple of 256.
    _arch("LFM2-350M", 1024, 16, 16, 8, 64, 4608, 65536, True, qk_norm=True, attention_layers=6, conv_kernel=3),
)}
# Published totals (model cards), for the self-check in the tests.
PUBLISHED_PARAMS = {"Qwen2.5-0.5B": 0.49e9, "Qwen2.5-1.5B": 1.54e9, "Qwen2.5-3B": 3.09e9, "Qwen2.5-7B": 7.61e9,
                    "Qwen2.5-14B": 14.7e9, "Qwen2.5-32B": 32.5e9, "Llama-3.1-8B": 8.03e9, "Llama-3.2-3B": 3.21e9,
                    "Llama-3.2-1B": 1.24e9, "SmolLM2-135M": 135e6, "SmolLM2-360M": 362e6, "SmolLM2-1.7B": 1.71e9,
                    "LFM2-350M": 354e6}


def bundled_arch(name_or_path: str) -> ModelArch | None:
    """The bundled architecture of a hub id or name ('Qwen/Qwen2.5-7B-Instruct', 'meta-llama/Llama-3.1-8B',
    'HuggingFaceTB/SmolLM2-135M-Instruct', 'rlt:smollm2-135m'); None if unknown. Instruct variants share the base."""
    base = str(name_or_path).rstrip("/").split("/")[-1].split(":")[-1].lower()
    base = re.sub(r"-(instruct|it|chat)$", "", base)
    base = base.replace("meta-llama-", "")
    for key, arch in BUNDLED_ARCHS.items():
        if key.lower() == base:
            return arch
    return None


def _round_up(x: int, multiple: int) -> int:
    return multiple * ((x + multiple - 1) // multiple)


def arch_from_hf_config(cfg: dict, name: str = "model") -> ModelArch:
    """A `ModelArch` from a Hugging Face config.json dict (Llama/Qwen2/Qwen3/Mistral/SmolLM/LFM2 style).

    Raises:
        ValueError: naming the missing key.
    """
    cfg = cfg.get("text_config") or cfg
    model_type = cfg.get("model_type", "")
    try:
        h, layers, heads = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        inter, vocab = int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    except KeyError as e:
        raise ValueError(f"config.json of {name} has no {e.args[0]!r} "
                         "(not a decoder-only transformer config?)") from None
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    attention_layers, conv_kernel = None, 0
    if model_type == "lfm2":
        types = cfg.get("layer_types")
        idxs = cfg.get("full_attn_idxs")
        attention_layers = (sum(t == "full_attention" for t in types) if types else len(idxs) if idxs else layers)
        conv_kernel = int(cfg.get("conv_L_cache", 3))
        if cfg.get("block_auto_adjust_ff_dim", False):
            inter = int(2 * inter / 3)
            if cfg.get("block_ffn_dim_multiplier") is not None:
                inter = int(cfg["block_ffn_dim_multiplier"] * inter)
            inter = _round_up(inter, int(cfg.get("block_multiple_of", 256)))
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = model_type in ("lfm2", "gemma", "gemma2", "gemma3_text")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return ModelArch(
        name=name, hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        intermediate_size=inter, vocab_size=vocab, tie_embeddings=bool(tied),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type in ("lfm2", "qwen3", "olmo2", "gemma3_text"),
        attention_layers=attention_layers, conv_kernel=conv_kernel,
        checkpoint_dtype=dtype if dtype in ("float32", "bfloat16", "float16") else None)
