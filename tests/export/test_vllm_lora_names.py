"""gemmatune's saved adapter goes through vLLM's LoRA loading rules for Gemma 4 with nothing dropped.

vLLM cannot run here (no GPU), so its rules are re-implemented from its source (vllm-project/vllm,
read 2026-12-01) and applied to a real saved adapter:
- vllm/lora/lora_model.py `LoRAModel.from_local_checkpoint`: module names come from the safetensors
  keys, not from adapter_config.json's target_modules; a key whose module's last name part is not in
  `expected_lora_modules` raises "expected target modules in ... but received ...".
- vllm/lora/worker_manager.py `_load_adapter`: expected_lora_modules = the last name part of every
  LinearBase module of the vLLM model, with packed modules replaced by their parts
  (packed_modules_mapping); the model's `hf_to_vllm_mapper` renames the keys.
- vllm/lora/utils.py `parse_fine_tuned_lora_name`: strip `base_model.model.`, map the rest through the
  mapper, module = the name without `.lora_A.weight` / `.lora_B.weight`.
- vllm/model_executor/models/utils.py `WeightsMapper._map_name`: every matching prefix, in order.
- vllm/model_executor/models/gemma4_mm.py `Gemma4ForConditionalGeneration` (what the released
  checkpoints' config names): hf_to_vllm_mapper prefixes below; packed qkv_proj = q,k,v and
  gate_up_proj = gate,up; the language model lives under `language_model` (get_mm_mapping), the only
  part that gets LoRA unless tower/connector LoRA is switched on.
- vllm/model_executor/models/gemma4.py `Gemma4ForCausalLM`: mapper `model.language_model.` ->
  `model.`; every decoder layer has qkv_proj, o_proj, gate_up_proj, down_proj (KV-shared ones too).
- vllm/lora/model_manager.py `_register_packed_modules` / `_create_merged_loras_inplace`: a packed
  module takes the LoRAs named `<prefix>.<part>` for its parts; a missing part stays None.
- vllm/lora/peft_helper.py `PEFTHelper`: needs r, lora_alpha, target_modules (a list or a string);
  refuses modules_to_save, DoRA, lora_bias, bias other than "none", PiSSA-style inits.
"""
import json

import pytest

import gemmatune
from tests.helpers import load_tiny

MULTIMODAL_MAPPER = {  # gemma4_mm.py, Gemma4ForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix
    "model.vision_tower": "vision_tower", "model.embed_vision": "embed_vision",
    "model.audio_tower.": "audio_tower.", "model.embed_audio.": "embed_audio.",
    "model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
    "model": "language_model.model",
}
TEXT_MAPPER = {"model.language_model.": "model."}  # gemma4.py, Gemma4ForCausalLM.hf_to_vllm_mapper
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
DECODER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def map_name(key: str, prefixes: dict) -> str:
    for prefix, new in prefixes.items():  # WeightsMapper._map_name: no break after a match
        if key.startswith(prefix):
            key = key.replace(prefix, new, 1)
    return key


def parse_fine_tuned_lora_name(name: str, prefixes: dict) -> tuple[str, bool]:
    if name.startswith("base_model.model."):
        name = "base_model.model." + map_name(name.replace("base_model.model.", ""), prefixes)
    else:
        name = map_name(name, prefixes)
    start = 2 if name.startswith("base_model.model.") else 0
    parts = name.split(".")
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2] == "lora_A"
    raise ValueError(f"{name} is unsupported LoRA weight")


def vllm_lora_modules(n_layers: int, root: str) -> list[str]:
    """The vLLM decoder modules that can hold a LoRA (every layer has all four)."""
    return [f"{root}.layers.{i}.{linear}" for i in range(n_layers) for linear in DECODER_LINEARS]


def expected_lora_modules() -> set[str]:
    suffixes = {linear.split(".")[-1] for linear in DECODER_LINEARS}
    return {part for s in suffixes for part in PACKED.get(s, [s])}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_dir):
    model, tokenizer = load_tiny()
    model = gemmatune.add_lora(model, r=8)
    folder = gemmatune.save_adapter(model, tokenizer, tmp_path_factory.mktemp("vllm") / "adapter")
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    config = json.loads((folder / "adapter_config.json").read_text())
    return keys, config


@pytest.mark.parametrize("prefixes, root", [(MULTIMODAL_MAPPER, "language_model.model"), (TEXT_MAPPER, "model")])
def test_every_adapter_tensor_lands_on_a_vllm_gemma4_module(adapter, prefixes, root):
    keys, _ = adapter
    loras = {}
    for key in keys:
        module, is_a = parse_fine_tuned_lora_name(key, prefixes)
        assert module.rsplit(".", 1)[-1] in expected_lora_modules(), module  # from_local_checkpoint's check
        loras.setdefault(module, set()).add("A" if is_a else "B")
    assert all(parts == {"A", "B"} for parts in loras.values())

    used = set()
    for module in vllm_lora_modules(4, root):  # the tiny model: 4 layers, the last 2 KV-shared
        prefix, last = module.rsplit(".", 1)
        parts = [f"{prefix}.{p}" for p in PACKED.get(last, [last])]
        found = [p for p in parts if p in loras]
        used.update(found)
        layer = int(module.split(".layers.")[1].split(".")[0])
        if last == "qkv_proj":  # K/V LoRA only where the layer computes K/V: a None slice elsewhere
            assert found == (parts if layer < 2 else parts[:1]), (module, found)
        else:
            assert found == parts, (module, found)
    assert used == set(loras)  # nothing in the adapter is left without a vLLM module


def test_old_and_new_names_reach_the_same_vllm_modules(adapter):
    """vLLM maps both layouts onto its modules (Gemma4ForConditionalGeneration's catch-all `model`
    prefix takes the text-only names too): adapters saved by older gemmatune keep working there."""
    keys, _ = adapter
    new = {parse_fine_tuned_lora_name(k, TEXT_MAPPER)[0] for k in keys}
    old = {parse_fine_tuned_lora_name(k.replace("model.language_model.", "model."), TEXT_MAPPER)[0] for k in keys}
    assert new == old and all(m.startswith("model.layers.") for m in new)
    new_mm = {parse_fine_tuned_lora_name(k, MULTIMODAL_MAPPER)[0] for k in keys}
    old_mm = {parse_fine_tuned_lora_name(k.replace("model.language_model.", "model."), MULTIMODAL_MAPPER)[0]
              for k in keys}
    assert new_mm == old_mm and all(m.startswith("language_model.model.layers.") for m in new_mm)


def test_the_adapter_config_is_one_vllm_accepts(adapter):
    _, config = adapter
    assert {"r", "lora_alpha", "target_modules"} <= set(config)
    assert isinstance(config["target_modules"], (str, list))
    assert not config.get("modules_to_save") and not config.get("use_dora") and not config.get("lora_bias")
    assert config.get("bias", "none") == "none"
    assert config.get("init_lora_weights", True) in (True, "gaussian")
    assert not config.get("layer_replication") and not config.get("alora_invocation_tokens")
    assert max([config["r"], *(config.get("rank_pattern") or {}).values()]) <= 64  # vLLM --max-lora-rank 64
