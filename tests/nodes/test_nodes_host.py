"""nodes/comfy_host/ inside a stand-in ComfyUI: the same module names and the few functions the pack calls.

The stand-in records what the pack asks of ComfyUI (model folders, model management, progress, interruption) so
the tests can check the conversation; tests/nodes/test_comfyui_integration.py runs the pack in the real thing.
"""

import enum
import sys
import types

import pytest
import torch

from nodes import comfy_host
from tests._nodes_helpers import node

W, H, STEPS, HANDOFF = 64, 96, 4, 3


class FakeInterrupt(Exception):
    """Stands for comfy.model_management.InterruptProcessingException."""


class PreviewMethod(enum.Enum):
    NoPreviews = "none"
    Latent2RGB = "latent2rgb"


class FakeComfy:
    def __init__(self, preview=PreviewMethod.Latent2RGB):
        self.interrupt = False
        self.interrupt_after = None  # set the flag once this many progress updates were made
        self.extra_folders = {}  # folder_paths.get_folder_paths: more folders per model folder key
        self.loads, self.patchers, self.updates, self.bars = [], [], [], []
        fake = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total = total
                fake.bars.append(self)

            def update_absolute(self, value, total=None, preview=None):
                # main.py's hook: every progress update is first an interruption point
                mm.throw_exception_if_processing_interrupted()
                fake.updates.append((value, total, preview))
                if fake.interrupt_after is not None and len(fake.updates) >= fake.interrupt_after:
                    fake.interrupt = True

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device
                fake.patchers.append(self)

        def throw():
            if fake.interrupt:
                fake.interrupt = False
                raise FakeInterrupt()

        mm = types.SimpleNamespace(
            get_torch_device=lambda: torch.device("cpu"), unet_offload_device=lambda: torch.device("cpu"),
            text_encoder_device=lambda: torch.device("cpu", 1), text_encoder_offload_device=lambda: torch.device("cpu"),
            vae_device=lambda: torch.device("cpu", 2), vae_offload_device=lambda: torch.device("cpu"),
            intermediate_device=lambda: torch.device("cpu"), unet_dtype=lambda device=None: torch.float32,
            vae_dtype=lambda device=None, allowed_dtypes=(): allowed_dtypes[-1],
            load_models_gpu=lambda models, **kw: fake.loads.append((list(models), kw)),
            processing_interrupted=lambda: fake.interrupt, throw_exception_if_processing_interrupted=throw)
        self.modules = {
            "folder_paths": types.SimpleNamespace(
                get_filename_list=lambda folder: [f"{folder}/one.safetensors"],
                get_folder_paths=lambda folder: [f"/models/{folder}", *fake.extra_folders.get(folder, [])],
                get_full_path_or_raise=lambda folder, name: f"/models/{folder}/{name}"),
            "comfy": types.ModuleType("comfy"),
            "comfy.model_management": mm,
            "comfy.model_patcher": types.SimpleNamespace(ModelPatcher=ModelPatcher),
            "comfy.utils": types.SimpleNamespace(ProgressBar=ProgressBar),
            "comfy.cli_args": types.SimpleNamespace(args=types.SimpleNamespace(preview_method=preview,
                                                                              preview_size=256)),
        }


@pytest.fixture
def comfy(monkeypatch):
    fake = FakeComfy()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(comfy_host.host, "_host", None)
    monkeypatch.setattr(comfy_host.host, "_host_checked", False)
    yield fake
    comfy_host.host._host, comfy_host.host._host_checked = None, False
    for patcher in fake.patchers:  # the stand-in's patchers must not outlive it on the shared tiny model
        patcher.model.network.__dict__.pop(comfy_host.host._PATCHER_ATTRIBUTE, None)


@pytest.fixture(scope="module")
def stage(tiny_checkpoints):
    from sdxl_core.checkpoints.loading import load_checkpoint

    base = load_checkpoint(tiny_checkpoints["base"])
    positive = node("TextEncodeBase").encode(base, "a red cube", "", "encode")[0]
    negative = node("TextEncodeBase").encode(base, "", "", "encode")[0]
    return base, positive, negative


def _sample(stage, end=HANDOFF):
    base, positive, negative = stage
    latent, _, _ = node("EmptyLatent").generate("custom", W, H, 1)
    return node("BaseSampler").sample(base, positive, negative, latent, 1, STEPS, 4.0, "euler", "normal", end,
                                      True, 1.0)[0]


def test_without_comfyui_everything_is_plain():
    assert not comfy_host.comfy_available()
    assert comfy_host.compute_device() == torch.device("cpu")
    assert comfy_host.default_dtypes() == (None, None)
    assert not comfy_host.interrupted()
    comfy_host.raise_if_interrupted()  # nothing to raise
    progress = comfy_host.StepProgress(3)
    progress.update(2, torch.zeros(1, 4, 8, 8))
    assert progress.done == 2


def test_standalone_model_folders_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.safetensors").write_bytes(b"x")
    (tmp_path / "readme.md").write_text("x")
    comfy_host.set_standalone_model_folders({})
    monkeypatch.setenv("SDXL_TWOSTAGE_CHECKPOINTS", str(tmp_path))
    assert comfy_host.model_filenames("checkpoints") == ["sub/m.safetensors"]
    assert comfy_host.model_path("checkpoints", "sub/m.safetensors") == tmp_path / "sub" / "m.safetensors"
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        comfy_host.model_path("checkpoints", "other.safetensors")


def test_inside_comfyui_files_and_devices_come_from_comfyui(comfy):
    assert comfy_host.comfy_available()
    assert comfy_host.model_filenames("checkpoints") == ["checkpoints/one.safetensors"]
    assert str(comfy_host.model_path("vae", "x.safetensors")) == "/models/vae/x.safetensors"
    assert comfy_host.default_dtypes() == (torch.float32, torch.float32)  # VAE: never fp16, from [bf16, fp32]
    choices = node("CheckpointLoader").INPUT_TYPES()["required"]["ckpt_name"][0]
    assert choices == ["checkpoints/one.safetensors"]


def test_embedding_folders_come_from_comfyui(comfy, tmp_path):
    comfy.extra_folders["embeddings"] = [str(tmp_path)]
    assert comfy_host.embedding_directories() == [tmp_path]  # /models/embeddings does not exist here


def test_networks_go_through_model_management_once_wrapped(comfy, stage):
    base = stage[0]
    comfy_host.prepare_networks([base.unet], role="unet")
    comfy_host.prepare_networks([base.clip_g, base.clip_l], role="text_encoder")
    comfy_host.prepare_networks([base.unet])
    comfy_host.prepare_networks([base.vae], role="vae")
    assert len(comfy.patchers) == 4  # one ModelPatcher per network, reused
    assert comfy.loads[0][0][0] is comfy.loads[2][0][0] and comfy.loads[0][1]["force_full_load"] is True
    assert comfy.loads[0][0][0].model.network is base.unet  # wrapped: our networks' `device` is read-only
    # ComfyUI's own devices for each kind of network (the stand-in tells them apart by index)
    assert [p.load_device.index for p in comfy.patchers] == [None, 1, 1, 2]
    with pytest.raises(ValueError, match="role must be one of"):
        comfy_host.prepare_networks([base.unet], role="clip")


def test_encoders_and_vae_nodes_use_their_roles(comfy, stage):
    base = stage[0]
    node("TextEncodeBase").encode(base, "x", "", "encode")
    node("VAEDecode").decode(base.vae, {"samples": torch.zeros(1, 4, 8, 8)}, "auto")
    roles = {id(p.model.network): p.load_device.index for p in comfy.patchers}
    assert roles == {id(base.clip_g): 1, id(base.clip_l): 1, id(base.vae): 2}


def test_sampler_reports_every_step_with_a_latent_preview(comfy, stage):
    _sample(stage)
    assert [(value, total) for value, total, _ in comfy.updates] == [(i, HANDOFF) for i in range(1, HANDOFF + 1)]
    kind, image, size = comfy.updates[-1][2]
    assert kind == "JPEG" and size == 256 and image.size == (W // 8, H // 8)
    assert any(patcher.model.network is stage[0].unet for patcher in comfy.patchers)


def test_no_previews_when_comfyui_has_them_off(comfy, stage):
    comfy.modules["comfy.cli_args"].args.preview_method = PreviewMethod.NoPreviews
    _sample(stage, end=2)
    assert [preview for _, _, preview in comfy.updates] == [None, None]


def test_interrupt_stops_within_one_step(comfy, stage):
    comfy.interrupt_after = 1  # the user presses Cancel during the first step
    with pytest.raises(FakeInterrupt):
        _sample(stage, end=STEPS)
    assert len(comfy.updates) == 1
    assert not comfy.interrupt  # ComfyUI's flag is consumed by its own exception


def test_interrupt_before_the_first_step_ends_as_comfyui_interrupt(comfy, stage):
    comfy.interrupt = True  # set while the text encoders ran: the sampler's cancel() sees it first
    with pytest.raises(FakeInterrupt):
        _sample(stage)
    assert comfy.updates == []


def test_latent_to_rgb_uses_the_sdxl_factors():
    from sdxl_core.runtime.preview import SDXL_LATENT_RGB_BIAS, latent_to_rgb

    zero = latent_to_rgb(torch.zeros(4, 2, 3))
    assert zero.shape == (2, 3, 3) and zero.dtype == torch.uint8
    expected = [int((b + 1) / 2 * 255) for b in SDXL_LATENT_RGB_BIAS]
    assert zero[0, 0].tolist() == expected
    first_channel = latent_to_rgb(torch.tensor([1.0, 0, 0, 0]).view(4, 1, 1))[0, 0].tolist()
    assert first_channel == [int((0.3651 + 0.1084 + 1) / 2 * 255), int((0.4232 - 0.0175 + 1) / 2 * 255),
                             int((0.4341 - 0.0011 + 1) / 2 * 255)]
    with pytest.raises(ValueError, match=r"\[4, height, width\]"):
        latent_to_rgb(torch.zeros(1, 4, 2, 2))


def test_requirements_leave_torch_to_comfyui():
    from pathlib import Path

    lines = [line.split("#")[0].strip() for line in
             (Path(__file__).resolve().parents[2] / "requirements.txt").read_text().splitlines()]
    names = {line.split(">")[0].split("=")[0].split("<")[0].strip().lower() for line in lines if line}
    assert "transformers" in names and not names & {"torch", "torchvision", "torchaudio"}


@pytest.mark.parametrize("tiling", ["auto", "never", "always"])
def test_vae_nodes_tell_comfyui_the_memory_an_untiled_pass_needs(comfy, stage, tiling):
    # ComfyUI evicts other models (the UNets) only for the memory it is told about: without it the VAE would find
    # the card full and tile (auto) or run out of memory (never), where ComfyUI's own VAE nodes evict first.
    from sdxl_core.runtime.vae_decoding import estimate_decode_bytes, estimate_encode_bytes

    vae = stage[0].vae
    node("VAEDecode").decode(vae, {"samples": torch.zeros(2, 4, H // 8, W // 8)}, tiling)
    node("VAEEncode").encode(vae, torch.rand(3, H, W, 3), tiling)
    (_, decode_kw), (_, encode_kw) = comfy.loads
    untiled = tiling != "always"
    assert decode_kw["memory_required"] == (estimate_decode_bytes(vae, 2, H, W, torch.float32) if untiled else 0)
    assert encode_kw["memory_required"] == (estimate_encode_bytes(vae, 3, H, W, torch.float32) if untiled else 0)


def test_vae_dtype_is_chosen_for_the_device_the_vae_runs_on(comfy):
    # --cpu-vae: ComfyUI runs its VAE on the CPU and picks the VAE dtype for the CPU, not for the GPU.
    mm = comfy.modules["comfy.model_management"]
    mm.vae_dtype = lambda device=None, allowed_dtypes=(): (torch.bfloat16 if device == mm.vae_device()
                                                           else torch.float16)
    assert comfy_host.default_dtypes()[1] == torch.bfloat16


def test_sampler_tells_comfyui_the_activation_memory_of_its_batch(comfy, stage):
    # A larger batch needs more room next to the UNet's weights; ComfyUI evicts other models only for what it is
    # told, so the request grows with the batch (guided: positive and negative) and the latent area.
    from sdxl_core.runtime.residency import (
        UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL as ACTIVATION_ELEMENTS_PER_LATENT_CELL,
    )

    base, positive, negative = stage
    for batch in (1, 4):
        comfy.loads.clear()
        latent, _, _ = node("EmptyLatent").generate("custom", W, H, batch)
        node("BaseSampler").sample(base, positive, negative, latent, 1, 2, 4.0, "euler", "normal", 2, True, 1.0)
        (unet_load,) = [kw for models, kw in comfy.loads if models[0].model.network is base.unet]
        cells = 2 * batch * (H // 8) * (W // 8)
        assert unet_load["memory_required"] == cells * ACTIVATION_ELEMENTS_PER_LATENT_CELL * 4  # fp32 weights here
    # A combined positive (two entries) runs three samples per latent item in one batch.
    comfy.loads.clear()
    latent, _, _ = node("EmptyLatent").generate("custom", W, H, 1)
    node("BaseSampler").sample(base, positive + positive, negative, latent, 1, 2, 4.0, "euler", "normal", 2, True, 1.0)
    (unet_load,) = [kw for models, kw in comfy.loads if models[0].model.network is base.unet]
    assert unet_load["memory_required"] == 3 * (H // 8) * (W // 8) * ACTIVATION_ELEMENTS_PER_LATENT_CELL * 4


def test_a_lorad_model_gets_its_own_patchers_and_shares_the_rest(comfy, stage, tmp_path):
    """The LoRA'd UNet is a new network with its own ModelPatcher (ComfyUI must not load the original in its
    place); networks the LoRA leaves alone stay the same objects, with the patcher they already had."""
    from safetensors.torch import save_file

    from tests._lora_files import kohya_lora

    base = stage[0]
    save_file({k: v.contiguous() for k, v in kohya_lora(base, text=False).items()}, str(tmp_path / "s.safetensors"))
    comfy.modules["folder_paths"].get_full_path_or_raise = lambda folder, name: str(tmp_path / name)
    assert node("LoraLoader").INPUT_TYPES()["required"]["lora_name"][0] == ["loras/one.safetensors"]
    comfy_host.prepare_networks([base.unet], role="unet")
    (styled,) = node("LoraLoader").apply(base, "s.safetensors", 1.0, 1.0)
    assert styled.unet is not base.unet and styled.clip_g is base.clip_g and styled.vae is base.vae
    comfy_host.prepare_networks([styled.unet], role="unet")
    assert [patcher.model.network for patcher in comfy.patchers] == [base.unet, styled.unet]
