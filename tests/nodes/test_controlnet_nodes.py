"""The ControlNet nodes without ComfyUI, on tiny checkpoints: Load SDXL ControlNet reads the controlnet folder,
SDXL Apply ControlNet puts the control on CONDITIONING in the shape the samplers run, and the base sampler's result
equals the core's KSampler emulation with the same ControlNet; inpainting through the sampler nodes equals the core
too."""

import math

import pytest
import torch

from nodes import comfy_host
from sdxl_core.checkpoints.controlnet import load_controlnet
from sdxl_core.sampling.control import CONTROL_OPTION, ControlNetApplication, apply_controlnet
from tests._checkpoints import write_tiny_controlnet
from tests._nodes_helpers import model_folders, node, node_class, use_folders
from tests._sampling_helpers import sample_with

SIZE_W, SIZE_H = 96, 64
STEPS, HANDOFF, SEED, CFG = 3, 2, 9, 4.0
CONTROLNET = "tiny_controlnet.safetensors"


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    found = model_folders(root, tiny_checkpoints)
    write_tiny_controlnet(root / "controlnet" / CONTROLNET)
    write_tiny_controlnet(root / "controlnet" / "sub" / "other.safetensors", seed=5)
    (root / "controlnet" / "readme.txt").write_text("not a model: must not be listed")
    found["controlnet"] = [str(root / "controlnet")]
    use_folders(found)
    yield found
    comfy_host.set_standalone_model_folders({})


@pytest.fixture(scope="module")
def base(folders):
    return node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default")[0]


@pytest.fixture(scope="module")
def conds(base):
    return (node("TextEncodeBase").encode(base, "a red cube", "", "encode")[0],
            node("TextEncodeBase").encode(base, "blurry", "", "encode")[0])


@pytest.fixture(scope="module")
def control_image():
    # Another size and aspect than the latent: the control is centre-cropped and resized on the way in.
    return torch.rand(1, 40, 100, 3, generator=torch.Generator().manual_seed(4))


def _latent():
    return node("EmptyLatent").generate("custom", SIZE_W, SIZE_H, 1)[0]


def _base_sample(base, positive, negative, latent, end_at_step=STEPS):
    return node("BaseSampler").sample(base, positive, negative, latent, SEED, STEPS, CFG, "euler", "normal",
                                      end_at_step, True, 1.0)[0]


def test_loader_lists_the_controlnet_folder_and_loads_the_file(folders):
    choices = node_class("ControlNetLoader").INPUT_TYPES()["required"]["control_net_name"][0]
    assert choices == ["sub/other.safetensors", CONTROLNET]
    (network,) = node("ControlNetLoader").load(CONTROLNET, "default")
    expected = load_controlnet(comfy_host.model_path("controlnet", CONTROLNET), dtype=torch.float32)
    assert network.config == expected.config
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), expected.state_dict().values()))
    (half,) = node("ControlNetLoader").load(CONTROLNET, "bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_loader_errors_are_sentences(folders):
    with pytest.raises(FileNotFoundError, match="was not found in the 'controlnet' folders"):
        node("ControlNetLoader").load("missing.safetensors", "default")
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        node("ControlNetLoader").load(CONTROLNET, "fp8")
    # A checkpoint in the controlnet folder is named for what it is.
    use_folders({**folders, "controlnet": folders["checkpoints"]})
    try:
        with pytest.raises(ValueError, match="is a full diffusion checkpoint, not a ControlNet"):
            node("ControlNetLoader").load("tiny_sdxl_base.safetensors", "default")
    finally:
        use_folders(folders)


def test_apply_puts_comfyuis_control_entry_on_both_sides(folders, conds, control_image):
    (network,) = node("ControlNetLoader").load(CONTROLNET, "default")
    positive, negative = conds
    out_positive, out_negative = node("ApplyControlNet").apply(positive, negative, network, control_image, 0.7,
                                                               0.1, 0.8)
    (control,) = {id(entry[1][CONTROL_OPTION]) for entry in out_positive + out_negative}  # one shared application
    application = out_positive[0][1][CONTROL_OPTION]
    assert isinstance(application, ControlNetApplication) and application.network is network
    assert (application.strength, application.start_percent, application.end_percent) == (0.7, 0.1, 0.8)
    assert application.previous is None
    assert CONTROL_OPTION not in positive[0][1] and CONTROL_OPTION not in negative[0][1]  # inputs left alone
    # A second Apply chains to the first, as ComfyUI's set_previous_controlnet does.
    chained, _ = node("ApplyControlNet").apply(out_positive, out_negative, network, control_image, 1.0, 0.0, 1.0)
    assert chained[0][1][CONTROL_OPTION].previous is application
    # Strength 0 hands the conditioning back unchanged (ComfyUI returns its inputs).
    assert node("ApplyControlNet").apply(positive, negative, network, control_image, 0.0, 0.0, 1.0) == \
        (positive, negative)


def test_base_sampler_with_the_controlnet_equals_the_core_ksampler(folders, base, conds, control_image):
    """The node graph (Load SDXL ControlNet -> SDXL Apply ControlNet -> SDXL Base Sampler) against the core's
    KSampler emulation given the same file, image and settings; and the ControlNet does change the result."""
    (network,) = node("ControlNetLoader").load(CONTROLNET, "default")
    (other,) = node("ControlNetLoader").load("sub/other.safetensors", "default")
    positive, negative = conds
    steered = node("ApplyControlNet").apply(positive, negative, network, control_image, 0.8, 0.0, 0.7)
    steered = node("ApplyControlNet").apply(*steered, other, control_image.flip(1), 0.5, 0.3, 1.0)
    ours = _base_sample(base, *steered, _latent())

    path = comfy_host.model_path("controlnet", CONTROLNET)
    core = apply_controlnet(positive, negative, load_controlnet(path, dtype=torch.float32), control_image, 0.8,
                            0.0, 0.7)
    core = apply_controlnet(*core, load_controlnet(comfy_host.model_path("controlnet", "sub/other.safetensors"),
                                                   dtype=torch.float32), control_image.flip(1), 0.5, 0.3, 1.0)
    expected = sample_with(base, _latent(), *core, seed=SEED, steps=STEPS, cfg=CFG, sampler="euler",
                           scheduler="normal")
    assert torch.equal(ours["samples"], expected["samples"])
    plain = _base_sample(base, positive, negative, _latent())
    assert (ours["samples"] - plain["samples"]).abs().max() > 1e-3


def test_two_stage_with_a_controlnet_on_the_base(folders, base, conds, control_image):
    refiner = node("CheckpointLoader").load("tiny_sdxl_refiner.safetensors", "default")[0]
    (network,) = node("ControlNetLoader").load(CONTROLNET, "default")
    steered = node("ApplyControlNet").apply(*conds, network, control_image, 1.0, 0.0, 1.0)
    handoff = _base_sample(base, *steered, _latent(), end_at_step=HANDOFF)
    refiner_conds = (node("TextEncodeRefiner").encode(refiner, "a red cube", "encode")[0],
                     node("TextEncodeRefiner").encode(refiner, "blurry", "encode")[0])
    (refined,) = node("RefinerSampler").sample(refiner, *refiner_conds, handoff, SEED, STEPS, CFG, "euler",
                                               "normal", HANDOFF, 1.0)
    assert refined["samples"].shape == (1, 4, SIZE_H // 8, SIZE_W // 8)
    assert torch.isfinite(refined["samples"]).all()
    # The refiner's conditioning cannot take an SDXL ControlNet: refused at the Apply node, before any sampling.
    with pytest.raises(ValueError, match=r"64-wide text embeddings, but this ControlNet was made for the SDXL "
                                         r"base.*not the refiner's"):
        node("ApplyControlNet").apply(*refiner_conds, network, control_image, 1.0, 0.0, 1.0)


def test_the_sampler_puts_the_controlnets_on_the_device_with_the_unet(monkeypatch, folders, base, conds,
                                                                      control_image):
    (network,) = node("ControlNetLoader").load(CONTROLNET, "default")
    steered = node("ApplyControlNet").apply(*conds, network, control_image, 1.0, 0.0, 1.0)
    steered = node("ApplyControlNet").apply(*steered, network, control_image, 0.5, 0.0, 1.0)  # the same one twice
    prepared = []
    real = comfy_host.prepare_networks

    def record(networks, role="unet", memory_required=0):
        networks = list(networks)
        prepared.append(([id(n) for n in networks], role))
        real(networks, role, memory_required)

    monkeypatch.setattr(comfy_host, "prepare_networks", record)
    _base_sample(base, *steered, _latent())
    assert prepared == [([id(base.unet), id(network)], "unet")]


def test_apply_refuses_bad_settings_and_inputs_in_sentences(folders, conds, control_image):
    (network,) = node("ControlNetLoader").load(CONTROLNET, "default")
    apply = node("ApplyControlNet").apply
    with pytest.raises(ValueError, match="start_percent 0.8 comes after end_percent 0.2"):
        apply(*conds, network, control_image, 1.0, 0.8, 0.2)
    with pytest.raises(ValueError, match="end_percent must be a finite number"):
        apply(*conds, network, control_image, 1.0, 0.0, math.nan)
    with pytest.raises(ValueError, match="strength must be at most 10.0"):
        apply(*conds, network, control_image, 11.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="control_net needs an SDXL ControlNet from 'Load SDXL ControlNet'"):
        apply(*conds, object(), control_image, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="the negative conditioning is empty"):
        apply(conds[0], [], network, control_image, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"control image must be an IMAGE \[batch, height, width, 3\]"):
        apply(*conds, network, control_image[..., :1], 1.0, 0.0, 1.0)
    assert node_class("ApplyControlNet").VALIDATE_INPUTS(strength=1.0) is True
    assert "strength must be a finite number" in node_class("ApplyControlNet").VALIDATE_INPUTS(strength=math.inf)


def test_apply_ignores_the_vae_as_comfyui_does_for_sdxl_controlnets(folders, base, conds, control_image):
    (network,) = node("ControlNetLoader").load(CONTROLNET, "default")
    with_vae = node("ApplyControlNet").apply(*conds, network, control_image, 1.0, 0.0, 1.0, vae=base.vae)
    without = node("ApplyControlNet").apply(*conds, network, control_image, 1.0, 0.0, 1.0)
    assert torch.equal(_base_sample(base, *with_vae, _latent())["samples"],
                       _base_sample(base, *without, _latent())["samples"])


# --- inpainting through the sampler nodes --------------------------------------------------------------------------

def test_set_latent_noise_mask_graph_equals_the_core_ksampler(folders, base, conds):
    """LoadImage's IMAGE and MASK -> SDXL VAE Encode -> SetLatentNoiseMask -> SDXL Base Sampler -> SDXL VAE Decode,
    against the core's KSampler emulation on the same latent and mask; outside the mask the latent is kept."""
    image = torch.rand(1, SIZE_H, SIZE_W, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, SIZE_H, SIZE_W)
    mask[:, :, SIZE_W // 2:] = 1.0  # repaint the right half
    (encoded,) = node("VAEEncode").encode(base.vae, image, "auto")
    # ComfyUI's SetLatentNoiseMask: a copy of the latent with the mask as [B, 1, H, W].
    masked = {**encoded, "noise_mask": mask.reshape(-1, 1, SIZE_H, SIZE_W)}
    ours = _base_sample(base, *conds, masked)
    expected = sample_with(base, masked, *conds, seed=SEED, steps=STEPS, cfg=CFG, sampler="euler",
                           scheduler="normal")
    assert torch.equal(ours["samples"], expected["samples"])
    assert torch.equal(ours["noise_mask"], masked["noise_mask"])
    kept = slice(0, SIZE_W // 16)  # latent columns well inside the unmasked left half
    assert torch.allclose(ours["samples"][..., kept], encoded["samples"][..., kept], atol=1e-5)
    assert not torch.allclose(ours["samples"], encoded["samples"], atol=1e-2)
    (decoded,) = node("VAEDecode").decode(base.vae, ours, "auto")
    assert decoded.shape == (1, SIZE_H, SIZE_W, 3)


# --- union ControlNets ---------------------------------------------------------------------------------------------

def test_a_union_controlnet_from_diffusers_is_refused_by_name(folders, tmp_path):
    """xinsir's controlnet-union-sdxl-1.0 (and ProMax) layout, written by diffusers' own ControlNetUnionModel: the
    loader names it and says why, before reading any weight (see sdxl_core/checkpoints/controlnet.py)."""
    diffusers = pytest.importorskip("diffusers")
    from sdxl_core.config import TINY_BASE_UNET

    union = diffusers.ControlNetUnionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=TINY_BASE_UNET.context_dim,
        attention_head_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        conditioning_embedding_out_channels=(16, 32), norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=TINY_BASE_UNET.adm_in_channels,
        num_control_type=8, num_trans_channel=32, num_proj_channel=32)
    folder = tmp_path / "controlnet"
    union.save_pretrained(folder / "union_promax", safe_serialization=True)
    (folder / "union_promax" / "diffusion_pytorch_model.safetensors").rename(folder / "union_promax.safetensors")
    use_folders({**folders, "controlnet": [str(folder)]})
    try:
        with pytest.raises(ValueError, match=r"union_promax\.safetensors is a multi-condition \"union\" ControlNet "
                                             r"\(xinsir controlnet-union-sdxl-1\.0 or its ProMax version\), which "
                                             r"sdxl_core does not run"):
            node("ControlNetLoader").load("union_promax.safetensors", "default")
    finally:
        use_folders(folders)
