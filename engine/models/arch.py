"""What loragate knows of a model from its Hugging Face config: ModelArchConfig, checked
against what the decoders compute (anything else is refused with a clear error), and the
layout of each layer's LoRA-targetable linear modules."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from loragate.adapters.module_names import FUSED_LINEARS, LLAMA_LINEARS, PLAIN_MLP_LINEARS

from ..errors import ModelConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "granite", "smollm3", "mixtral", "qwen3_moe",
                         "olmo2", "olmo3", "gemma2", "gemma3_text", "starcoder2")
# Where the decoder layers' modules live in a checkpoint and in peft's module names: plain
# causal LMs, and Gemma 3's multimodal checkpoints (saved by transformers 4 and named by 5).
TEXT_MODULE_PREFIXES = ("model.",)
MULTIMODAL_MODULE_PREFIXES = ("language_model.model.", "model.language_model.")
# What a multimodal checkpoint holds besides its language model; text-only serving skips it.
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# Linear modules of Gemma 3's SigLIP vision tower, which peft's "all-linear" adapts too.
VISION_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LAYER_TYPES = ("sliding_attention", "full_attention")
# RoPE variants whose frequencies do not depend on the sequence being processed.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# LongRoPE (Phi-3.5, Phi-4-mini, the 128k Phi-3s): transformers switches a whole forward
# pass to the long factors once it reaches original_max_position_embeddings, so what a
# position computes would depend on how the sequence was split into passes. loragate picks
# one set at load, as vLLM does: by default it serves original_max_position_embeddings
# positions with the short factors (exact); a max_model_len past that serves up to
# max_position_embeddings with the long factors at every position (rope_tables), exact for
# sequences past original_max, not for shorter ones.
LONGROPE = "longrope"


@dataclass(frozen=True)
class LinearModule:
    """A LoRA-targetable linear module of every decoder layer."""
    parent: str  # its parent in an HF decoder layer ("self_attn", "mlp"): part of peft's names
    projection: str  # our Projection that computes it (several modules share qkv_proj, gate_up_proj)
    fan_in: int
    fan_out: int


@dataclass(frozen=True)
class LoraParameter:
    """A parameter that peft adapts directly (target_parameters): a sparse-expert block's
    stacked experts or its router. Its LoRA holds one A/B pair per stacked matrix."""
    parent: str  # "mlp": part of peft's names, as LinearModule.parent
    experts: int  # matrices stacked in it (1: the router's one)
    fan_in: int  # of each matrix
    fan_out: int


@dataclass(frozen=True)
class ModelArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int  # as the config says (LongRoPE too: context_limit picks the default context)
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool = False  # q and k RMS-normed per head before RoPE (Qwen3, Gemma 3)
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window, None for full attention
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (SmolLM3's every fourth)
    # Granite, Gemma 2 and 3 (gemma.py); Llama's values by default:
    attention_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    embedding_scale: float | None = None  # the token embeddings are multiplied by it
    residual_scale: float | None = None  # Granite: each layer's attention and MLP outputs are multiplied by it
    logits_divisor: float | None = None  # Granite: the final logits are divided by it
    attention_softcap: float | None = None  # Gemma 2: scaled scores s become cap * tanh(s / cap)
    logit_softcap: float | None = None  # Gemma 2: and so do the final logits
    # Multimodal checkpoints (Gemma 3 4B and up), served text-only: their language model's
    # module prefixes, and the prefixes of modules (vision tower) that text never reaches.
    module_prefixes: tuple[str, ...] = TEXT_MODULE_PREFIXES
    skipped_prefixes: tuple[str, ...] = ()
    foreign_modules: tuple[str, ...] = ()  # linear modules' names in what is skipped
    fused_linears: bool = False  # Phi-3: q/k/v and gate/up are one checkpoint (and peft) module each
    plain_mlp: bool = False  # StarCoder2: c_proj(gelu(c_fc(x))), no gate (starcoder2.py)
    # Sparse experts in place of the MLP (moe.py); 0: a dense MLP.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0  # each expert's intermediate size
    normalize_expert_weights: bool = True  # the top-k router weights are rescaled to sum to 1
    expert_weights_in_fp32: bool = False  # Mixtral scales expert outputs by fp32 weights

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @cached_property
    def linear_modules(self) -> dict[str, LinearModule]:
        """The layers' targetable linears by checkpoint name, each projection's in output order."""
        q, kv, h, i = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.hidden_size, \
            self.intermediate_size
        if self.plain_mlp:
            shapes = {"q_proj": ("qkv_proj", h, q), "k_proj": ("qkv_proj", h, kv), "v_proj": ("qkv_proj", h, kv),
                      "o_proj": ("o_proj", q, h), "c_fc": ("up_proj", h, i), "c_proj": ("down_proj", i, h)}
            parents = PLAIN_MLP_LINEARS
        elif self.fused_linears:
            shapes = {"qkv_proj": ("qkv_proj", h, q + 2 * kv), "o_proj": ("o_proj", q, h),
                      "gate_up_proj": ("gate_up_proj", h, 2 * i), "down_proj": ("down_proj", i, h)}
            parents = FUSED_LINEARS
        else:
            shapes = {"q_proj": ("qkv_proj", h, q), "k_proj": ("qkv_proj", h, kv), "v_proj": ("qkv_proj", h, kv),
                      "o_proj": ("o_proj", q, h), "gate_proj": ("gate_up_proj", h, i),
                      "up_proj": ("gate_up_proj", h, i), "down_proj": ("down_proj", i, h)}
            parents = LLAMA_LINEARS
        if self.is_moe:  # the MLP's experts are not linear modules (moe.py)
            shapes = {name: shape for name, shape in shapes.items() if parents[name] != "mlp"}
        return {name: LinearModule(parents[name], *shape) for name, shape in shapes.items()}

    @cached_property
    def lora_parameters(self) -> dict[str, LoraParameter]:
        """Parameters peft's target_parameters may adapt, by name under their parent: a
        sparse-expert block's experts (transformers 5 stacks them per layer, gate/up rows
        fused) and router. In definition order, which is the order peft nests their wrappers."""
        if not self.is_moe:
            return {}
        e, h, i = self.num_experts, self.hidden_size, self.expert_size
        return {"experts.gate_up_proj": LoraParameter("mlp", e, h, 2 * i),
                "experts.down_proj": LoraParameter("mlp", e, i, h),
                "gate.weight": LoraParameter("mlp", 1, h, e)}

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def is_gemma3(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def is_olmo(self) -> bool:
        return self.model_type in ("olmo2", "olmo3")

    @property
    def is_gemma(self) -> bool:
        return self.model_type in ("gemma2", "gemma3_text")

    @classmethod
    def from_hf(cls, hf) -> "ModelArchConfig":
        if hf.model_type == "gemma3":  # image + text: its language model serves text requests
            return replace(cls.from_hf(text_config(hf)), module_prefixes=MULTIMODAL_MODULE_PREFIXES,
                           skipped_prefixes=VISION_PREFIXES, foreign_modules=VISION_LINEAR_MODULES)
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(f"model_type {hf.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if hf.model_type in ("gemma2", "gemma3_text"):
            from .gemma import gemma_arch

            return gemma_arch(cls, hf)
        if hf.model_type == "starcoder2":
            from .starcoder2 import starcoder2_arch

            return starcoder2_arch(cls, hf)
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {hf.hidden_act!r} is not supported (only silu)")
        is_phi3 = hf.model_type == "phi3"
        check_rope(hf, SUPPORTED_ROPE_TYPES + ((LONGROPE,) if is_phi3 else ()))
        rope = getattr(hf, "rope_parameters", None) or {}
        if rope.get("partial_rotary_factor", 1.0) != 1.0 and not is_phi3:  # transformers' Llama rotates whole heads
            raise ModelConfigError(f"partial_rotary_factor is not supported for model_type {hf.model_type!r}")
        fields = common_fields(hf)
        if hf.model_type == "granite":  # scaling constants where Llama has none (1.0 means none)
            fields.update(attention_scale=hf.attention_multiplier, embedding_scale=hf.embedding_multiplier,
                          residual_scale=hf.residual_multiplier, logits_divisor=hf.logits_scaling)
        if hf.model_type in ("mixtral", "qwen3_moe"):
            fields.update(moe_fields(hf))
        if hf.model_type == "smollm3":
            fields["nope_layers"] = tuple(i for i, has_rope in enumerate(hf.no_rope_layers) if not has_rope)
        is_qwen2 = hf.model_type == "qwen2"
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            **fields,
            fused_linears=is_phi3,
            qkv_bias=is_qwen2 or attention_bias,
            qk_norm=hf.model_type in ("qwen3", "qwen3_moe"),
            layer_windows=layer_windows(hf),
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        )


def rope_layer_types(hf) -> tuple[str, ...]:
    """The layer types with RoPE parameters of their own (Gemma 3, OLMo 3: "full_attention",
    "sliding_attention"); () when one set serves every layer."""
    params = getattr(hf, "rope_parameters", None) or {}
    return tuple(t for t in LAYER_TYPES if isinstance(params.get(t), dict))


def check_rope(hf, supported: tuple[str, ...]) -> None:
    params = getattr(hf, "rope_parameters", None) or {}
    for layer_type in rope_layer_types(hf) or (None,):
        rope_type = (params[layer_type] if layer_type else params).get("rope_type", "default")
        if rope_type not in supported:
            raise ModelConfigError(f"rope_type {rope_type!r}{f' ({layer_type})' if layer_type else ''} is not "
                                   f"supported (supported: {', '.join(supported)})")


def moe_fields(hf) -> dict:
    """ModelArchConfig's expert fields of a Mixtral or Qwen3-MoE config."""
    if hf.model_type == "mixtral":
        return dict(num_experts=hf.num_local_experts, experts_per_token=hf.num_experts_per_tok,
                    expert_size=hf.intermediate_size, expert_weights_in_fp32=True)
    if hf.mlp_only_layers or hf.decoder_sparse_step != 1:
        raise ModelConfigError("Qwen3-MoE with dense MLP layers (mlp_only_layers, decoder_sparse_step > 1) is not "
                               "supported; every layer must be sparse, as in the released models")
    return dict(num_experts=hf.num_experts, experts_per_token=hf.num_experts_per_tok,
                expert_size=hf.moe_intermediate_size, normalize_expert_weights=bool(hf.norm_topk_prob))


def projection_biases(c: ModelArchConfig) -> dict[str, bool]:
    """A decoder layer's projections, and whether each has a bias (sparse-expert models have
    no MLP projections)."""
    attention = {"qkv_proj": c.qkv_bias, "o_proj": c.o_bias}
    up = "up_proj" if c.plain_mlp else "gate_up_proj"
    return attention if c.is_moe else attention | {up: c.mlp_bias, "down_proj": c.mlp_bias}


def text_config(hf):
    """The language model's config: Gemma 3's multimodal checkpoints nest it as text_config."""
    return hf.text_config if hf.model_type == "gemma3" else hf


def layer_windows(hf) -> tuple[int | None, ...]:
    """Each layer's sliding window, as transformers applies them: per `layer_types` where the
    config has them (Qwen2/Qwen3 with use_sliding_window, Gemma 3), else `sliding_window` on
    every layer (Mistral); () without one."""
    window = getattr(hf, "sliding_window", None)
    if window is None or (hf.model_type == "smollm3" and not hf.use_sliding_window):  # SmolLM3 keeps the size regardless
        return ()
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
    return tuple(window if t == "sliding_attention" else None for t in types[:hf.num_hidden_layers])


def common_fields(hf) -> dict:
    """The ModelArchConfig fields every supported family reads the same way from its HF config."""
    return dict(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.norm_epsilon if hf.model_type == "starcoder2" else hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
    )


def longrope_original_max(hf) -> int | None:
    """original_max_position_embeddings of a LongRoPE model; None for any other RoPE."""
    rope = getattr(text_config(hf), "rope_parameters", None) or {}
    return rope.get("original_max_position_embeddings") if rope.get("rope_type") == LONGROPE else None


def context_limit(hf, requested: int | None) -> tuple[int, str | None]:
    """max_model_len before the KV cache's cap: the model's max_position_embeddings (a LongRoPE
    model's original_max_position_embeddings, where its short factors apply, unless more are
    asked for), or fewer if asked; and, when more were asked for, what to tell the user."""
    limit = ModelArchConfig.from_hf(hf).max_position_embeddings
    if requested is None:
        return longrope_original_max(hf) or limit, None
    if requested <= limit:
        return requested, None
    return limit, f"max_model_len {requested} is more than this model's {limit} positions; serving {limit}"


def longrope_note(hf, max_len: int, served: int) -> str | None:
    """What to tell the user when a LongRoPE model's RoPE tables are built for max_len
    positions, past original_max_position_embeddings: the long factors then apply to every
    position (so K/V never needs recomputing), unlike transformers below that length. served:
    max_model_len after the KV cache's cap. None when the short factors apply."""
    original = longrope_original_max(hf)
    if original is None or max_len <= original:
        return None
    note = (f"max_model_len {max_len} is past this LongRoPE model's original_max_position_embeddings {original}: "
            f"its long factors apply to every position, so sequences of up to {original} tokens differ from "
            f"transformers (which uses the short factors there); --max-model-len <= {original} keeps the short factors")
    if served <= original:
        note += (f". The KV cache holds only {served} tokens, so max_model_len is {served}, no longer context than "
                 "the short factors serve: raise --kv-cache-memory")
    return note
