"""The modules of a base model that LoRA adapters target, as HF (and so peft) names them."""

from __future__ import annotations

# LoRA-targetable linear module -> its parent in every decoder layer, as HF names them: the
# Llama layout (Llama, Mistral, Qwen, Gemma), and Phi-3's, whose q/k/v and gate/up are one
# module each in the checkpoint and so in peft's adapters.
LLAMA_LINEARS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
FUSED_LINEARS: dict[str, str] = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
# StarCoder2's: its MLP has no gate, and other names.
PLAIN_MLP_LINEARS: dict[str, str] = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                                     "o_proj": "self_attn", "c_fc": "mlp", "c_proj": "mlp"}
# The model's vocabulary modules, outside the decoder layers (keyed as layer VOCAB_LAYER):
# peft adapts the input embedding with an embedding LoRA (lora_embedding_A/B) and the output
# head with a linear one. Unsloth's continued-pretraining recipes target both.
VOCAB_LAYER = -1
VOCAB_MODULES = ("embed_tokens", "lm_head")
