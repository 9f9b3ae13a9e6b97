"""sdxl_core.checkpoints.lora: SDXL LoRA files merged into a copy of a loaded model.

The LoRA files are written here in kohya's layout from names the references use (diffusers' UNet2DConditionModel
module paths, transformers' CLIP paths), never from our own mapping, so a wrong mapping cannot hide.
"""

import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from sdxl_core.app.demo import build_random_model
from sdxl_core.checkpoints.lora import LoRAError, apply_lora, merged_weight, unet_diffusers_names
from sdxl_core.config import ADM_SCALAR_EMBED_DIM
from sdxl_core.models.timestep_embedding import timestep_embedding
from sdxl_core.text.openclip_conversion import openclip_to_transformers
from tests._comfyui_reference import comfyui_imports_or_skip
from tests._lora_files import RANK, adaptable_layers, kohya_lora, lora_delta, lora_pair, text_modules


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base


@pytest.fixture(scope="module")
def refiner(tiny_refiner):
    return tiny_refiner


@pytest.fixture(scope="module")
def lora(base):
    return kohya_lora(base)


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("stage", ["base", "refiner"])
def test_unet_names_are_diffusers_names(stage, base, refiner):
    from tests._diffusers_twins import diffusers_unet

    model = base if stage == "base" else refiner
    ours = adaptable_layers(model.unet)
    theirs = adaptable_layers(diffusers_unet(model.unet))
    names = unet_diffusers_names(model.unet.config, list(ours))
    assert sorted(names.values()) == sorted(theirs)
    # Same weights under the paired names: diffusers' own converter agrees with the pairing, layer by layer.
    for path, layer in ours.items():
        assert torch.equal(layer.weight, theirs[names[path]].weight), path


def test_full_size_unet_names_cover_sdxl_layers():
    from sdxl_core.config import SDXL_BASE
    from sdxl_core.models.unet import UNetModel

    unet = UNetModel(SDXL_BASE.unet, device="meta")
    names = unet_diffusers_names(SDXL_BASE.unet, list(adaptable_layers(unet)))
    assert names["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert names["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert names["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    middle = "transformer_blocks.9.ff.net.2"
    assert names[f"middle_block.1.{middle}"] == f"mid_block.attentions.0.{middle}"
    assert names["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["output_blocks.8.0.skip_connection"] == "up_blocks.2.resnets.2.conv_shortcut"
    assert names["label_emb.0.2"] == "add_embedding.linear_2"


# ------------------------------------------------------------------------------------------------ merge


def _unet_inputs(config, gen):
    x = torch.randn(1, 4, 16, 16, generator=gen)
    context = torch.randn(1, 77, config.context_dim, generator=gen)
    pooled = torch.randn(1, 1280, generator=gen)
    n_scalars = (config.adm_in_channels - 1280) // ADM_SCALAR_EMBED_DIM
    time_ids = torch.randint(0, 2048, (1, n_scalars), generator=gen).float()
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), ADM_SCALAR_EMBED_DIM).reshape(1, -1)], dim=1)
    return x, torch.tensor([500.0]), context, y, pooled, time_ids


def test_unet_lora_matches_a_hand_merge_on_the_diffusers_twin(base, lora):
    """Every UNet Linear and conv (LoCon) patched: the diffusers twin merged by hand under diffusers' names gives
    the same weights (via diffusers' converter) and the same eps as our merged UNet."""
    from tests._diffusers_twins import diffusers_unet

    strength = 0.7
    merged = apply_lora(base, lora, strength_model=strength, strength_clip=0.0)
    twin = diffusers_unet(base.unet)
    with torch.no_grad():
        for path, layer in adaptable_layers(twin).items():
            name = "lora_unet_" + path.replace(".", "_")
            up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
            factor = strength * float(lora[f"{name}.alpha"]) / RANK
            layer.weight += lora_delta(up, down, layer.weight.shape, factor).float()
    ours_as_diffusers = diffusers_unet(merged.unet).state_dict()
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(ours_as_diffusers[key], value, rtol=1e-6, atol=1e-6, msg=key)
    x, t, context, y, pooled, time_ids = _unet_inputs(base.config.unet, torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours = merged.unet(x, t, context, y)
        ref = twin(x, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        before = base.unet(x, t, context, y)
    assert (ours - before).abs().max() > 1e-3  # the LoRA changes the output: the comparison can fail
    assert (ours - ref).abs().max() / ref.abs().max() <= 1e-5


def test_hand_computed_merges_on_a_linear_a_conv_and_a_bigg_slice(base):
    gen = torch.Generator().manual_seed(5)
    linear = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    conv = "lora_unet_up_blocks_0_resnets_1_conv1"
    q_te1 = "lora_te1_text_model_encoder_layers_1_self_attn_q_proj"
    k_te2 = "lora_te2_text_model_encoder_layers_2_self_attn_k_proj"
    unet_sd = base.unet.state_dict()
    g_sd = base.clip_g.state_dict()
    width = base.config.clip_g.hidden_size
    shapes = {linear: unet_sd["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape,
              conv: unet_sd["output_blocks.1.0.in_layers.2.weight"].shape,
              q_te1: base.clip_l.state_dict()["text_model.encoder.layers.1.self_attn.q_proj.weight"].shape,
              k_te2: (width, width)}
    state = {}
    for name, shape in shapes.items():
        state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"] = lora_pair(tuple(shape), gen)
    state[f"{linear}.alpha"] = torch.tensor(8.0)  # scale 8 / 4 = 2
    state[f"{conv}.alpha"] = torch.tensor(1.0)  # 1 / 4; the text layers have no alpha: scale 1
    merged = apply_lora(base, state, strength_model=0.5, strength_clip=-1.5)

    def expected(old, name, factor):
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        return (old.double() + factor * torch.einsum("or,rikl->oikl" if down.ndim == 4 else "or,ri->oi",
                                                     up.flatten(1).double(), down.double())).float()

    new_unet = merged.unet.state_dict()
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    torch.testing.assert_close(new_unet[key], expected(unet_sd[key], linear, 0.5 * 2), rtol=0, atol=1e-6)
    key = "output_blocks.1.0.in_layers.2.weight"
    assert new_unet[key].shape[2:] == (3, 3)
    torch.testing.assert_close(new_unet[key], expected(unet_sd[key], conv, 0.5 / 4), rtol=0, atol=1e-6)
    key = "text_model.encoder.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged.clip_l.state_dict()[key],
                               expected(base.clip_l.state_dict()[key], q_te1, -1.5), rtol=0, atol=1e-6)
    # bigG's fused OpenCLIP in_proj: only the k rows [d:2d] change.
    key = "transformer.resblocks.2.attn.in_proj_weight"
    new_in_proj, old_in_proj = merged.clip_g.state_dict()[key], g_sd[key]
    assert torch.equal(new_in_proj[:width], old_in_proj[:width])
    assert torch.equal(new_in_proj[2 * width:], old_in_proj[2 * width:])
    torch.testing.assert_close(new_in_proj[width:2 * width], expected(old_in_proj[width:2 * width], k_te2, -1.5),
                               rtol=0, atol=1e-6)
    # Exactly the four weights changed.
    changed = [k for k, v in new_unet.items() if not torch.equal(v, unet_sd[k])]
    assert sorted(changed) == ["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                               "output_blocks.1.0.in_layers.2.weight"]


def test_half_precision_weights_merge_in_float32():
    weight = (torch.randn(6, 5) * 100).half()
    up, down = torch.randn(6, 2), torch.randn(2, 5) * 1e-3
    out = merged_weight(weight, up, down, 0.37)
    assert out.dtype == torch.float16 and out.data_ptr() != weight.data_ptr()
    assert torch.equal(out, (weight.float() + 0.37 * (up @ down)).half())


def test_a_reused_float32_buffer_gives_the_same_merge():
    weight = torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last)
    up, down = torch.randn(8, 2, 1, 1), torch.randn(2, 6, 3, 3)
    plain = merged_weight(weight, up, down, 0.25)
    scratch = torch.full((1000,), float("nan"))
    reused = merged_weight(weight, up, down, 0.25, device="cpu", scratch=scratch)
    assert torch.equal(reused, plain) and reused.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="at least 432 elements"):
        merged_weight(weight, up, down, 0.25, scratch=torch.empty(10))


def test_text_encoder_outputs_change_only_with_strength_clip(base, lora):
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    unet_only = apply_lora(base, lora, strength_model=1.0, strength_clip=0.0)
    clip_only = apply_lora(base, lora, strength_model=0.0, strength_clip=1.0)
    assert unet_only.clip_l is base.clip_l and unet_only.clip_g is base.clip_g
    assert clip_only.unet is base.unet and clip_only.clip_g is not base.clip_g
    with torch.inference_mode():
        for name in ("clip_l", "clip_g"):
            old, new = getattr(base, name)(tokens), getattr(clip_only, name)(tokens)
            assert (old[0] - new[0]).abs().max() > 1e-3, name


# ------------------------------------------------------------------------------------------------ no mutation


def test_the_given_model_is_untouched_and_untouched_tensors_are_shared(base):
    gen = torch.Generator().manual_seed(9)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_1_attn1_to_v"
    shape = tuple(base.unet.state_dict()["middle_block.1.transformer_blocks.1.attn1.to_v.weight"].shape)
    up, down = lora_pair(shape, gen)
    te2 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    up2, down2 = lora_pair(tuple(base.clip_g.state_dict()["transformer.resblocks.0.mlp.c_fc.weight"].shape), gen)
    state = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
             f"{te2}.lora_up.weight": up2, f"{te2}.lora_down.weight": down2}
    before = {component: {k: (p, p.data_ptr(), p.detach().clone()) for k, p in net.named_parameters()}
              for component, net in base.modules().items()}
    merged = apply_lora(base, state)
    for component, net in base.modules().items():
        for key, parameter in net.named_parameters():
            same_object, pointer, values = before[component][key]
            assert parameter is same_object and parameter.data_ptr() == pointer
            assert torch.equal(parameter, values), f"{component}.{key} was modified"
    patched = {("unet", "middle_block.1.transformer_blocks.1.attn1.to_v.weight"),
               ("clip_g", "hf_model.text_model.encoder.layers.0.mlp.fc1.weight")}
    for component in ("unet", "clip_g"):
        new_net, old_net = getattr(merged, component), getattr(base, component)
        assert new_net is not old_net
        old = dict(old_net.named_parameters())
        for key, parameter in new_net.named_parameters():
            if (component, key) in patched:
                assert parameter.data_ptr() != old[key].data_ptr()
                assert not torch.equal(parameter, old[key])
            else:
                assert parameter.data_ptr() == old[key].data_ptr(), f"{component}.{key} was copied"
                assert parameter is not old[key]  # own Parameter objects: moving one model leaves the other
    assert merged.clip_l is base.clip_l and merged.vae is base.vae and merged.tokenizer is base.tokenizer
    assert merged.config is base.config and merged.dtype == base.dtype
    # Moving the copy in place leaves the original's parameters where they were.
    merged.unet.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in base.unet.parameters())


def test_zero_strengths_return_the_model_itself_after_checking_the_file(base, lora, refiner):
    assert apply_lora(base, lora, 0.0, 0.0) is base
    with pytest.raises(LoRAError):
        apply_lora(refiner, lora, 0.0, 0.0)


def test_chained_loras_add_up(base, lora):
    second = kohya_lora(base, seed=1, alpha=None)
    chained = apply_lora(apply_lora(base, lora, 0.6, 0.4), second, -0.3, 0.8)
    key = "lora_unet_down_blocks_2_attentions_1_transformer_blocks_1_ff_net_0_proj"
    ours = "input_blocks.8.1.transformer_blocks.1.ff.net.0.proj.weight"
    old = base.unet.state_dict()[ours].double()
    want = old + lora_delta(lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"], old.shape, 0.6 * 2.0 / RANK)
    want = want + lora_delta(second[f"{key}.lora_up.weight"], second[f"{key}.lora_down.weight"], old.shape, -0.3)
    torch.testing.assert_close(chained.unet.state_dict()[ours].double(), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ formats


def _renamed(lora: dict, base_model) -> dict:
    """The same LoRA under diffusers/PEFT names (unet.<path>.lora_A/B, text_encoder(_2).<path>.lora_A/B)."""
    from tests._diffusers_twins import diffusers_unet

    names = {"lora_unet_" + p.replace(".", "_"): "unet." + p for p in adaptable_layers(diffusers_unet(base_model.unet))}
    for component, prefix, diffusers in (("clip_l", "lora_te1_", "text_encoder."),
                                         ("clip_g", "lora_te2_", "text_encoder_2.")):
        names.update({prefix + p.replace(".", "_"): diffusers + p for p in text_modules(base_model)[component]})
    out = {}
    for key, value in lora.items():
        module, _, role = key.partition(".")
        role = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight"}.get(role, role)
        out[f"{names[module]}.{role}"] = value
    return out


def test_diffusers_peft_names_give_the_same_model(base, lora):
    kohya = apply_lora(base, lora, 0.8, 0.9)
    peft = apply_lora(base, _renamed(lora, base), 0.8, 0.9)
    for component in ("unet", "clip_l", "clip_g"):
        for (key, a), (_, b) in zip(getattr(kohya, component).named_parameters(),
                                    getattr(peft, component).named_parameters()):
            assert torch.equal(a, b), f"{component}.{key}"


def test_other_diffusers_spellings_and_sgm_kohya_names(base):
    gen = torch.Generator().manual_seed(4)
    shape = tuple(base.unet.state_dict()["input_blocks.5.1.transformer_blocks.0.attn2.to_out.0.weight"].shape)
    up, down = lora_pair(shape, gen)
    spellings = [
        {"lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight": up,
         "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_out_0.lora_down.weight": down},
        {"unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.lora.up.weight": up,
         "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.lora.down.weight": down},
        {"unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": up,
         "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": down},
        {"down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.lora_B.weight": up,
         "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.lora_A.weight": down},
    ]
    key = "input_blocks.5.1.transformer_blocks.0.attn2.to_out.0.weight"
    results = [apply_lora(base, state).unet.state_dict()[key] for state in spellings]
    assert not torch.equal(results[0], base.unet.state_dict()[key])
    for result in results[1:]:
        assert torch.equal(result, results[0])


def test_lora_files_on_disk(base, lora, tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({k: v.contiguous() for k, v in lora.items()}, str(path))
    from_file = apply_lora(base, path, 1.0, 1.0)
    in_memory = apply_lora(base, lora, 1.0, 1.0, device="cpu")
    assert torch.equal(from_file.unet.out[2].weight, in_memory.unet.out[2].weight)
    assert not torch.equal(from_file.unet.out[2].weight, base.unet.out[2].weight)
    # diffusers' attention-processor spelling has none of the lora_up/lora_A markers: still read as a LoRA.
    shape = tuple(base.unet.state_dict()["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"].shape)
    up, down = lora_pair(shape, torch.Generator().manual_seed(1))
    processor = tmp_path / "processor.safetensors"
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.up.weight": up,
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.down.weight": down},
              str(processor))
    merged = apply_lora(base, processor)
    assert not torch.equal(merged.unet.input_blocks[4][1].transformer_blocks[0].attn1.to_k.weight,
                           base.unet.input_blocks[4][1].transformer_blocks[0].attn1.to_k.weight)


# ------------------------------------------------------------------------------------------------ refusals


def _one_layer(name: str, shape: tuple, extra: dict | None = None) -> dict:
    up, down = lora_pair(shape, torch.Generator().manual_seed(0))
    return {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, **(extra or {})}


@pytest.mark.parametrize("state, message", [
    ({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, "LoHa"),
    ({"lora_unet_down_blocks_1_attentions_0_proj_in.lokr_w1": torch.zeros(2, 2)}, "LoKr"),
    ({"lora_unet_down_blocks_1_attentions_0_proj_in.oft_blocks": torch.zeros(2, 2)}, "OFT"),
    (_one_layer("lora_unet_down_blocks_1_attentions_0_proj_in", (64, 64),
                {"lora_unet_down_blocks_1_attentions_0_proj_in.dora_scale": torch.ones(64, 1)}), "DoRA"),
    (_one_layer("lora_unet_conv_in", (32, 4, 3, 3),
                {"lora_unet_conv_in.lora_mid.weight": torch.zeros(4, 4, 3, 3)}), "Tucker"),
    (_one_layer("lora_unet_conv_in", (32, 4, 3, 3),
                {"lora_unet_down_blocks_1_attentions_0_norm.diff": torch.zeros(64)}),
     "not LoRA down/up/alpha weights: 'lora_unet_down_blocks_1_attentions_0_norm.diff'"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3)}, "has no up tensor"),
    (_one_layer("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (768, 768)),
     "SD 1.x/2.x LoRA, not an SDXL one: it adapts a single text encoder"),
    (_one_layer("lora_unet_down_blocks_0_attentions_0_proj_in", (32, 32)),
     "SD 1.x/2.x LoRA, not an SDXL one: it adapts attention layers at the first UNet level"),
    (_one_layer("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", (64, 768)),
     "its UNet cross-attention reads 768-wide text"),
    (_one_layer("lora_unet_down_blocks_1_attentions_0_transformer_blocks_7_attn1_to_q", (64, 64)),
     "1 layer name(s) match no layer of this SDXL base: "
     "'lora_unet_down_blocks_1_attentions_0_transformer_blocks_7_attn1_to_q'"),
    (_one_layer("lora_unet_down_blocks_1_attentions_0_proj_in", (64, 32)),
     "shapes that do not fit: 'lora_unet_down_blocks_1_attentions_0_proj_in' (up [64, 4], down [4, 32] for a weight "
     "[64, 64])"),
])
def test_refusals_say_why(base, state, message):
    with pytest.raises(LoRAError) as error:
        apply_lora(base, state, name="x.safetensors")
    assert message in str(error.value)
    assert "x.safetensors" in str(error.value)


@pytest.mark.parametrize("text", [True, False], ids=["with text encoders", "unet only"])
def test_a_base_lora_on_the_refiner_is_refused_with_advice(refiner, base, text):
    with pytest.raises(LoRAError) as error:
        apply_lora(refiner, kohya_lora(base, text=text), name="style.safetensors")
    message = str(error.value)
    assert "style.safetensors does not fit the SDXL refiner" in message
    assert "SDXL LoRAs are trained for the base model" in message


def test_a_refiner_lora_applies_to_the_refiner(refiner):
    state = kohya_lora(refiner, seed=2)
    assert any(key.startswith("lora_te_") for key in state)
    merged = apply_lora(refiner, state)
    assert not torch.equal(merged.unet.out[2].weight, refiner.unet.out[2].weight)


def test_a_checkpoint_given_as_a_lora_is_refused(base, tiny_checkpoints, tmp_path):
    from sdxl_core.checkpoints.lora import read_lora_file

    with pytest.raises(LoRAError, match="is an SDXL base checkpoint, not a LoRA: load checkpoints with the SDXL "
                                        "checkpoint loader"):
        read_lora_file(tiny_checkpoints["base"])
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, str(loha))
    with pytest.raises(LoRAError, match="LoHa"):
        apply_lora(base, loha)


def _tiny_base():
    from sdxl_core.config import TINY_BASE

    return build_random_model(TINY_BASE, seed=1)


def test_a_restructured_unet_is_refused(lora):
    from sdxl_core.runtime.optimize import fuse_qkv

    model = _tiny_base()
    fuse_qkv(model.unet)
    with pytest.raises(LoRAError, match="fused for speed"):
        apply_lora(model, lora)


def test_a_compiled_unet_and_non_finite_strengths_are_refused(lora):
    model = _tiny_base()
    model.unet.compile()  # marks the module; nothing is traced until it is called
    with pytest.raises(LoRAError, match="compiled"):
        apply_lora(model, lora)
    for strengths in ((float("nan"), 1.0), (1.0, float("inf"))):
        with pytest.raises(LoRAError, match="must be a finite number"):
            apply_lora(_tiny_base(), lora, *strengths)


def test_devices_named_without_an_index_and_a_storage_device(base, lora):
    """`device="cpu:0"` names the device tensors report as `cpu`; and with `storage` every tensor of the new model
    lives there (meta stands in for a host's offload device), the original staying where it was."""
    reference = apply_lora(base, lora, 0.5, 0.5)
    indexed = apply_lora(base, lora, 0.5, 0.5, device="cpu:0")
    for (name, a), (_, b) in zip(reference.unet.state_dict().items(), indexed.unet.state_dict().items()):
        assert torch.equal(a, b), name
    moved = apply_lora(base, lora, 0.5, 0.5, storage="meta")
    for network in (moved.unet, moved.clip_l, moved.clip_g):
        assert {t.device.type for t in (*network.parameters(), *network.buffers())} == {"meta"}
    assert moved.vae is base.vae  # untouched networks are the same objects, wherever they are
    assert {p.device.type for p in base.unet.parameters()} == {"cpu"}


# ------------------------------------------------------------------------------------------------ ComfyUI


def _comfy_lora():
    """ComfyUI's comfy.lora and comfy.utils from COMFYUI_PATH (comfy.model_base, which needs torchvision, stood in
    for: load_lora and the SDXL key maps only test isinstance against its classes)."""
    path = os.environ.get("COMFYUI_PATH")
    if not path or not os.path.isfile(os.path.join(path, "comfy", "lora.py")):
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to compare against ComfyUI itself")
    if "comfy.lora" not in sys.modules:
        # On sys.path only while importing: the checkout has its own `tests` package, which would shadow ours.
        saved_path = list(sys.path)
        sys.path.insert(0, path)
        try:
            with comfyui_imports_or_skip("ComfyUI's LoRA code"):
                import comfy.cli_args
        except BaseException:
            sys.path[:] = saved_path
            raise

        if "comfy.model_management" not in sys.modules:
            comfy.cli_args.args.cpu = True
        stood_in = "comfy.model_base" not in sys.modules
        if stood_in:
            stand_in = types.ModuleType("comfy.model_base")

            class _NeverThisModel:
                pass

            def _classes(name):
                if name[:1].isupper():
                    return _NeverThisModel
                raise AttributeError(name)

            stand_in.__getattr__ = _classes
            sys.modules["comfy.model_base"] = stand_in
            comfy.model_base = stand_in  # comfy.lora reads it as an attribute of the package
        try:
            with comfyui_imports_or_skip("ComfyUI's LoRA code"):
                import comfy.lora  # noqa: F401
        finally:
            sys.path[:] = saved_path
            if stood_in:
                del sys.modules["comfy.model_base"]
    return sys.modules["comfy.lora"], sys.modules["comfy.utils"]


def test_merged_weights_equal_comfyuis_lora_code(base, lora):
    """ComfyUI's key maps (model_lora_keys_unet/clip), load_lora and calculate_weight on the same weights."""
    comfy_lora, _ = _comfy_lora()
    config = base.config.unet
    per_level = config.num_res_blocks + 1
    unet_config = {"num_res_blocks": [config.num_res_blocks] * config.num_levels,
                   "channel_mult": list(config.channel_mult),
                   "transformer_depth": [d for d in config.transformer_depth for _ in range(config.num_res_blocks)],
                   "transformer_depth_output": [d for d in config.transformer_depth for _ in range(per_level)],
                   "transformer_depth_middle": config.transformer_depth_middle}
    weights = {f"diffusion_model.{k}": v for k, v in base.unet.state_dict().items()}
    weights.update({f"clip_l.transformer.{k}": v for k, v in base.clip_l.state_dict().items()})
    weights.update({f"clip_g.transformer.{k}": v
                    for k, v in openclip_to_transformers(base.clip_g.state_dict()).items()})
    model = types.SimpleNamespace(state_dict=lambda: weights,
                                  model_config=types.SimpleNamespace(unet_config=unet_config))
    key_map = comfy_lora.model_lora_keys_unet(model, {})
    key_map = comfy_lora.model_lora_keys_clip(model, key_map)
    patches = comfy_lora.load_lora(lora, key_map, log_missing=False)
    assert len(patches) == sum(k.endswith(".lora_up.weight") for k in lora)  # ComfyUI applies every layer too

    s_model, s_clip = 0.8, -0.6
    merged = apply_lora(base, lora, s_model, s_clip)
    ours = {f"diffusion_model.{k}": v for k, v in merged.unet.state_dict().items()}
    ours.update({f"clip_l.transformer.{k}": v for k, v in merged.clip_l.state_dict().items()})
    ours.update({f"clip_g.transformer.{k}": v
                 for k, v in openclip_to_transformers(merged.clip_g.state_dict()).items()})
    for key, adapter in patches.items():
        strength = s_model if key.startswith("diffusion_model.") else s_clip
        reference = comfy_lora.calculate_weight([(strength, adapter, 1.0, None, None)], weights[key].clone(), key)
        torch.testing.assert_close(ours[key], reference, rtol=1e-6, atol=1e-6, msg=key)
    untouched = set(weights) - set(patches)
    assert all(torch.equal(ours[k], weights[k]) for k in untouched)


# ------------------------------------------------------------------------------------------------ full size


def _full_size_twin_layers(config) -> dict[str, tuple]:
    """diffusers' UNet2DConditionModel for a full-size config, built on the meta device: layer path -> shape."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils

    from sdxl_core.models.unet import UNetModel
    from tests._diffusers_twins import sgm_network_config

    checkpoint = {f"model.diffusion_model.{k}": v for k, v in UNetModel(config, device="meta").state_dict().items()}
    settings = single_file_utils.create_unet_diffusers_config_from_ldm(sgm_network_config(config), checkpoint)
    settings.update(class_embed_type=None, addition_embed_type="text_time",
                    addition_time_embed_dim=ADM_SCALAR_EMBED_DIM)
    with torch.device("meta"):
        twin = UNet2DConditionModel(**settings)
    return {path: tuple(layer.weight.shape) for path, layer in adaptable_layers(twin).items()}


def test_a_full_size_sdxl_lora_lands_on_the_full_size_base_on_meta():
    """The 722 attention layers of a standard kohya SDXL LoRA, LoCon convs and all text-encoder layers of the real
    SDXL architecture, merged on the meta device (shapes only, no memory)."""
    from sdxl_core.config import CLIP_BIG_G, CLIP_L, SDXL_BASE, SDXL_REFINER
    from sdxl_core.models.bundle import SDXLModel
    from sdxl_core.models.unet import UNetModel
    from sdxl_core.text.encoders import TextEncoder

    def meta_model(config):
        return SDXLModel(config=config, unet=UNetModel(config.unet, device="meta"), vae=None,
                         clip_g=TextEncoder(CLIP_BIG_G, device="meta"),
                         clip_l=TextEncoder(CLIP_L, device="meta") if config.clip_l else None,
                         tokenizer=None, source=None, dtype=torch.float16)

    base = meta_model(SDXL_BASE)
    layers = _full_size_twin_layers(SDXL_BASE.unet)
    assert sum(".attentions." in path for path in layers) == 722
    state = {}
    for path, shape in layers.items():
        up, down = (torch.empty(shape[0], RANK, *[1] * (len(shape) - 2), device="meta"),
                    torch.empty(RANK, *shape[1:], device="meta"))
        state[f"lora_unet_{path.replace('.', '_')}.lora_up.weight"] = up
        state[f"lora_unet_{path.replace('.', '_')}.lora_down.weight"] = down
    for prefix, width, count in (("lora_te1_", 768, 12), ("lora_te2_", 1280, 32)):
        for layer in range(count):
            for module, (out_dim, in_dim) in {"self_attn_q_proj": (width, width), "self_attn_k_proj": (width, width),
                                              "self_attn_v_proj": (width, width),
                                              "self_attn_out_proj": (width, width), "mlp_fc1": (4 * width, width),
                                              "mlp_fc2": (width, 4 * width)}.items():
                name = f"{prefix}text_model_encoder_layers_{layer}_{module}"
                state[f"{name}.lora_up.weight"] = torch.empty(out_dim, RANK, device="meta")
                state[f"{name}.lora_down.weight"] = torch.empty(RANK, in_dim, device="meta")
    merged = apply_lora(base, state)
    assert merged.unet is not base.unet and merged.clip_l is not base.clip_l and merged.clip_g is not base.clip_g
    assert merged.unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.weight.shape == (640, 640)
    with pytest.raises(LoRAError, match="SDXL LoRAs are trained for the base model"):
        apply_lora(meta_model(SDXL_REFINER), state)
