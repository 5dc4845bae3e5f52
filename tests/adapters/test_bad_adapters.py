"""Every way an uploaded adapter can be wrong ends in an AdapterError with a specific code and
a message that names what is wrong. Most bad adapters are made by peft itself (IA3,
prefix tuning, modules_to_save, another hidden size); the rest are a good peft adapter with
one thing broken."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PrefixTuningConfig
from peft import LoraConfig as PeftLoraConfig

from loragate.adapters import pool as pool_module
from loragate.adapters.errors import AdapterError
from .conftest import edit_config, edit_weights, poison
from loragate.adapters.loader import WEIGHTS_FILE, load_adapter

GOOD = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
EMBED = "base_model.model.model.embed_tokens"
MAX_RANK = 8






def _set(key, value):
    return lambda t: t.__setitem__(key, value)




def _as_dora(also=None):
    """The good adapter turned into a DoRA one (a magnitude of ones per module), then `also`."""
    def make(d: Path) -> None:
        def add(t):
            for key in [k for k in t if k.endswith("lora_B.weight")]:
                t[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(t[key].shape[0])
            if also is not None:
                also(t)
        edit_config(d, use_dora=True)
        edit_weights(d, add)
    return make


class _Evil:
    """Unpickling this creates a marker file: proof the loader never unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_only(d: Path) -> None:
    (d / WEIGHTS_FILE).unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Evil(d.parent / "UNPICKLED")))


def _named_subfolder(d: Path) -> None:
    (d / "mine").mkdir()
    for f in ("adapter_config.json", WEIGHTS_FILE):
        shutil.move(d / f, d / "mine" / f)


def _header_claims_huge(d: Path) -> None:
    (d / WEIGHTS_FILE).write_bytes((2**40).to_bytes(8, "little") + b"{}")


# id -> (how to break a copy of the good adapter | peft kwargs for a fresh one, load kwargs, code, message fragment)
CASES = {
    "missing_config": (lambda d: (d / "adapter_config.json").unlink(), {}, "missing_file", "adapter_config.json is missing"),
    "missing_weights": (lambda d: (d / WEIGHTS_FILE).unlink(), {}, "missing_file", "adapter_model.safetensors is missing"),
    "named_adapter_subfolder": (_named_subfolder, {}, "missing_file", "subdirectory 'mine'"),
    "pickle_bin_only": (_pickle_only, {}, "pickle_weights", "adapter_model.bin"),
    "truncated_safetensors": (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-100]), {},
                              "invalid_weights", "not a valid safetensors file"),
    "header_claims_huge": (_header_claims_huge, {}, "invalid_weights", "not a valid safetensors file"),
    "not_json": (lambda d: (d / "adapter_config.json").write_text("{r: 4"), {}, "invalid_config", "not valid JSON"),
    "r_is_a_string": (lambda d: edit_config(d, r="4"), {}, "invalid_config", "r must be a positive integer"),
    "other_hidden_size": ({"hidden_size": 32}, {}, "shape_mismatch",
                          "expected [4, 128] (r=4, in_features=128): was it trained for another base model?"),
    "rank_differs_from_config": (lambda d: edit_config(d, r=6), {}, "shape_mismatch", "rank differs from r"),
    "nan": (lambda d: edit_weights(d, poison(f"{Q0}.lora_A.weight", float("nan"))), {},
            "non_finite_weights", f"{Q0}.lora_A.weight"),
    "inf": (lambda d: edit_weights(d, poison("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
                                              float("inf"))), {}, "non_finite_weights", "layers.1.mlp.down_proj.lora_B"),
    "overflow_after_scaling": (lambda d: (edit_config(d, lora_alpha=1e38),
                                          edit_weights(d, poison(f"{Q0}.lora_B.weight", 1e30))), {},
                               "non_finite_weights", "after scaling"),
    "integer_dtype": (lambda d: edit_weights(d, _set(f"{Q0}.lora_A.weight", torch.ones(4, 64, dtype=torch.int32))), {},
                      "invalid_weights", "dtype I32"),
    "rank_above_max": ({"r": 16}, {}, "rank_too_large", "max_lora_rank=8"),
    "dora_without_magnitudes": (lambda d: edit_config(d, use_dora=True), {}, "invalid_weights",
                                "no lora_magnitude_vector for model.layers.0.mlp.down_proj"),
    "dora_magnitude_wrong_shape": (_as_dora(_set(f"{Q0}.lora_magnitude_vector", torch.ones(32))), {},
                                   "shape_mismatch", "expected [64] (out_features=64)"),
    "dora_magnitude_nan": (_as_dora(poison(f"{Q0}.lora_magnitude_vector", float("nan"))), {},
                           "non_finite_weights", f"{Q0}.lora_magnitude_vector"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, {}, "unsupported_adapter", "modules_to_save"),
    "bias_all": ({"bias": "all"}, {}, "unsupported_adapter", "bias='all'"),
    "rank_pattern_not_an_integer": (lambda d: edit_config(d, rank_pattern={"q_proj": "2"}), {}, "invalid_config",
                                    "rank_pattern['q_proj'] must be a positive integer"),
    "alpha_pattern_bad_regex": (lambda d: edit_config(d, alpha_pattern={"q_(proj": 2}), {}, "invalid_config",
                                "alpha_pattern key 'q_(proj' is not a valid regular expression"),
    "rank_pattern_disagrees_with_weights": (lambda d: edit_config(d, rank_pattern={"q_proj": 2}), {}, "shape_mismatch",
                                            "rank differs from r (or rank_pattern)"),
    "rank_pattern_above_max": ({"rank_pattern": {"q_proj": 16}}, {}, "rank_too_large", "rank_pattern's 16"),
    "pissa_unconverted": (lambda d: edit_config(d, init_lora_weights="pissa"), {}, "unsupported_adapter",
                          "path_initial_model_for_weight_conversion"),
    "unknown_option": (lambda d: edit_config(d, use_future_trick=True), {}, "unsupported_adapter", "use_future_trick"),
    "ia3": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), {},
            "unsupported_adapter", "'IA3'"),
    "prefix_tuning": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), {},
                      "unsupported_adapter", "'PREFIX_TUNING'"),
    "embedding_for_another_vocabulary": (lambda d: (edit_config(d, target_modules=[*GOOD["target_modules"], "embed_tokens"]), edit_weights(
        d, lambda t: t.update({f"{EMBED}.lora_embedding_A": torch.zeros(4, 77), f"{EMBED}.lora_embedding_B": torch.zeros(
            64, 4)}))), {}, "shape_mismatch", "lora_embedding_A' has shape [4, 77]"),
    "gpt2_style_target": (lambda d: edit_config(d, target_modules=["c_attn"]), {}, "unknown_target_module", "c_attn"),
    "regex_selects_nothing": (lambda d: edit_config(d, target_modules=r".*\.attn\.c_proj"), {},
                              "unknown_target_module", "selects no module"),
    "layer_out_of_range": (lambda d: edit_config(d, layers_to_transform=[5]), {}, "unknown_target_module", "layer 5"),
    "dora_vector_without_dora": (lambda d: edit_weights(d, _set(f"{Q0}.lora_magnitude_vector", torch.ones(64))), {},
                                 "invalid_weights", "DoRA magnitude vector"),
    "lora_b_bias_without_lora_bias": (lambda d: edit_weights(d, _set(f"{Q0}.lora_B.bias", torch.zeros(64))), {},
                                      "invalid_weights", "does not set lora_bias=true"),
    "lora_bias_without_biases": (lambda d: edit_config(d, lora_bias=True), {}, "invalid_weights",
                                 "no lora_B.bias for model.layers.0.mlp.down_proj"),
    "lora_a_bias": (lambda d: edit_weights(d, _set(f"{Q0}.lora_A.bias", torch.zeros(4))), {}, "invalid_weights", "a bias"),
    "untargeted_module_key": (lambda d: edit_weights(d, _set(Q0.replace("q_proj", "k_proj") + ".lora_A.weight",
                                                             torch.zeros(4, 64))), {},
                              "invalid_weights", "does not target it"),
    "lm_head_key_not_targeted": (lambda d: edit_weights(d, _set("base_model.model.lm_head.lora_A.weight",
                                                                torch.zeros(4, 64))), {},
                                 "invalid_weights", "is for lm_head, but adapter_config.json does not target it"),
    "missing_lora_b": (lambda d: edit_weights(d, lambda t: t.pop(f"{Q0}.lora_B.weight")), {},
                       "invalid_weights", "no lora_B for model.layers.0.self_attn.q_proj"),
    "two_adapters_in_one_file": (lambda d: edit_weights(d, lambda t: t.__setitem__(
        f"{Q0}.lora_A.other.weight", t[f"{Q0}.lora_A.weight"].clone())), {}, "invalid_weights", "mixes several adapters"),
    "base_model_mismatch_strict": (lambda d: edit_config(d, base_model_name_or_path="Qwen/Qwen2.5-7B"),
                                   dict(base_model_name="tiny-llama", strict_base_model=True),
                                   "base_model_mismatch", "'Qwen/Qwen2.5-7B'"),
    "too_large": (lambda d: None, dict(max_bytes=1000), "too_large", "the limit is 1000"),
}


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, save_peft):
    path = tmp_path_factory.mktemp("good")
    save_peft(path, PeftLoraConfig(**GOOD))
    return path


def test_the_good_adapter_loads(good_adapter, arch):
    assert len(load_adapter(good_adapter, arch, MAX_RANK).modules) == 6


def test_a_dora_adapter_loads_its_magnitudes(good_adapter, arch, tmp_path):
    shutil.copytree(good_adapter, tmp_path / "dora")
    _as_dora(_set(f"{Q0}.lora_magnitude_vector", torch.full((64,), 2.0)))(tmp_path / "dora")
    weights = load_adapter(tmp_path / "dora", arch, MAX_RANK)
    assert weights.config.use_dora and set(weights.magnitudes) == set(weights.modules)
    assert weights.magnitudes[(0, "q_proj")].eq(2.0).all() and weights.magnitudes[(1, "v_proj")].shape == (32,)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_adapter(case, tmp_path, good_adapter, arch, save_peft):
    make, load_kwargs, code, fragment = CASES[case]
    d = tmp_path / "adapter"
    if callable(make):
        shutil.copytree(good_adapter, d)
        make(d)
    elif isinstance(make, dict):  # a LoRA made by peft with these options (hidden_size: of its base model)
        hidden = make.get("hidden_size", 64)
        save_peft(d, PeftLoraConfig(**{**GOOD, **{k: v for k, v in make.items() if k != "hidden_size"}}),
                  hidden_size=hidden)
    else:  # another PEFT method's config
        save_peft(d, make)
    with pytest.raises(AdapterError) as e:
        load_adapter(d, arch, MAX_RANK, **load_kwargs)
    assert e.value.code == code, str(e.value)
    assert fragment in str(e.value)
    assert not (tmp_path / "UNPICKLED").exists()


def test_an_adapter_for_the_other_projection_layout_is_refused(good_adapter, arch, tmp_path):
    """Phi-3's checkpoints (and so peft's adapters of them) fuse q/k/v and gate/up into one
    module each: an adapter of the separate layout names modules a Phi-3 base lacks, and the
    other way round; either is refused with the modules the base has."""
    from dataclasses import replace

    with pytest.raises(AdapterError) as e:
        load_adapter(good_adapter, replace(arch, fused_linears=True), MAX_RANK)
    assert e.value.code == "unknown_target_module"
    assert "['q_proj', 'v_proj'] match no module" in str(e.value)
    assert "qkv_proj, o_proj, gate_up_proj, down_proj" in str(e.value)

    fused = tmp_path / "fused"
    shutil.copytree(good_adapter, fused)
    edit_config(fused, target_modules=["qkv_proj", "down_proj"])
    with pytest.raises(AdapterError) as e:
        load_adapter(fused, arch, MAX_RANK)
    assert e.value.code == "unknown_target_module" and "['qkv_proj'] match no module" in str(e.value)


def test_an_adapter_of_expert_mlps_is_refused_on_a_sparse_expert_model(good_adapter, arch):
    """Mixtral and Qwen3-MoE have no linear MLP modules (transformers 5 keeps experts as 3-D
    parameters, and adapters of transformers 4's per-expert modules do not fit them): an
    adapter targeting the MLP is refused, naming what can be adapted (attention projections,
    and the experts and router as parameters)."""
    from dataclasses import replace

    moe = replace(arch, num_experts=4, experts_per_token=2, expert_size=32)
    with pytest.raises(AdapterError) as e:
        load_adapter(good_adapter, moe, MAX_RANK)
    assert e.value.code == "unknown_target_module"
    assert "['down_proj'] match no module" in str(e.value) and "q_proj, k_proj, v_proj, o_proj in" in str(e.value)
    assert "through target_parameters experts.gate_up_proj, experts.down_proj, gate.weight" in str(e.value)


def test_expert_adapters_are_checked_and_their_stacks_made_on_first_use(tiny_qwen3_moe, tmp_path, save_lora,
                                                                        monkeypatch):
    """target_parameters on a MoE model: a key of a parameter the config does not target (the
    inner of two nested wrappers) or of another expert count is refused by name; the pool makes
    a parameter's stacks only when the first adapter targeting it comes, and says so when
    there is no memory for them."""
    from loragate.adapters.pool import LoraSlotPool
    from loragate.engine.models.arch import ModelArchConfig
    from loragate.engine.models.loader import load_hf_config

    arch = ModelArchConfig.from_hf(load_hf_config(tiny_qwen3_moe))
    both = save_lora(tiny_qwen3_moe, tmp_path / "both", 0.1, seed=1, r=4, target_modules=[],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    down = tmp_path / "down"
    shutil.copytree(both, down)
    edit_config(down, target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(AdapterError) as e:
        load_adapter(down, arch, MAX_RANK)
    assert e.value.code == "unknown_target_module" and "layers.0.mlp.experts.base_layer.lora_A" in str(e.value)
    fewer = tmp_path / "fewer"
    shutil.copytree(both, fewer)
    edit_weights(fewer, lambda t: t.update({k: v[: v.shape[0] // 2] for k, v in t.items() if "lora_A" in k}))
    with pytest.raises(AdapterError) as e:
        load_adapter(fewer, arch, MAX_RANK)
    assert e.value.code == "shape_mismatch" and f"{arch.num_experts} x r=4" in str(e.value)

    pool = LoraSlotPool(arch, 2, MAX_RANK, torch.float32)
    attn = save_lora(tiny_qwen3_moe, tmp_path / "attn", 0.1, seed=2, r=4, target_modules=["q_proj"])
    pool.acquire("attn", lambda: load_adapter(attn, arch, MAX_RANK))
    assert set(pool.a) == set(arch.linear_modules)
    only_down = save_lora(tiny_qwen3_moe, tmp_path / "only-down", 0.1, seed=3, r=4, target_modules=[],
                          target_parameters=["mlp.experts.down_proj"])
    weights = load_adapter(only_down, arch, MAX_RANK)
    pool.acquire("down", lambda: weights)
    assert set(pool.a) == set(arch.linear_modules) | {"experts.down_proj"}
    assert pool.a["experts.down_proj"].shape == (arch.num_layers, 2, arch.num_experts, MAX_RANK, arch.expert_size)
    full = LoraSlotPool(arch, 2, MAX_RANK, torch.float32)
    monkeypatch.setattr(full, "_make_stacks", lambda name: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(AdapterError) as e:
        full.make_stacks(weights)
    assert e.value.code == "too_large" and "no memory for the slots of experts.down_proj" in str(e.value)
    # On the host an allocation past what is free would succeed, and its first write kill the process.
    short = LoraSlotPool(arch, 2, MAX_RANK, torch.float32)
    monkeypatch.setattr(pool_module, "_host_available", lambda: 4096)
    with pytest.raises(AdapterError) as e:
        short.make_stacks(weights)
    assert e.value.code == "too_large" and "the host has 0.0 GiB available" in str(e.value)
    assert "experts.down_proj" not in short.a


def test_transformers_4_expert_adapters_are_checked(tiny_mixtral, tmp_path, save_per_expert_lora):
    """A per-expert (transformers 4) adapter missing an expert, naming an expert the model does
    not have, or with NaN in one expert is refused, naming where."""
    from loragate.engine.models.arch import ModelArchConfig
    from loragate.engine.models.loader import load_hf_config

    arch = ModelArchConfig.from_hf(load_hf_config(tiny_mixtral))
    good = save_per_expert_lora(tiny_mixtral, tmp_path / "good", seed=1)
    assert load_adapter(good, arch, MAX_RANK).rank == 8  # gate and up fused: twice the rank
    cases = {
        "missing": (lambda t: t.pop(next(k for k in t if ".experts.2.w3.lora_B" in k)),
                    "invalid_weights", "no lora_B for expert 2 of model.layers.0.mlp.experts.gate_up_proj"),
        "extra": (lambda t: t.update({k.replace(".experts.0.", f".experts.{arch.num_experts}."): v.clone()
                                      for k, v in list(t.items()) if ".experts.0.w2" in k}),
                  "unknown_target_module", f"its {arch.num_experts} experts have w1, w3, w2"),
        "nan": (lambda t: t[next(k for k in t if ".experts.1.w2.lora_A" in k)].fill_(float("nan")),
                "non_finite_weights", "experts.down_proj's experts contains NaN"),
    }
    for name, (edit, code, message) in cases.items():
        bad = tmp_path / name
        shutil.copytree(good, bad)
        edit_weights(bad, edit)
        with pytest.raises(AdapterError) as e:
            load_adapter(bad, arch, MAX_RANK)
        assert e.value.code == code and message in str(e.value), name
