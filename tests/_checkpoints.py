"""Writers of tiny SDXL checkpoints in every layout the loader accepts, and of the bad files it must refuse.

The diffusers layouts are produced with diffusers' own forward conversion functions (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`), so the loader's reverse mapping is checked against an
independent implementation rather than against itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl_core.checkpoints.detect import component_prefixes
from sdxl_core.checkpoints.loading import save_checkpoint
from sdxl_core.checkpoints.validation import build_component
from sdxl_core.config import SDXLConfig
from sdxl_core.models.bundle import SDXLModel
from sdxl_core.text.tokenizer import SDXLTokenizer


def tiny_model(config: SDXLConfig, seed: int = 0) -> SDXLModel:
    """A random SDXLModel of `config` on the CPU in float32 (biases and norm weights randomised too).

    Built on the meta device and filled by `load_state_dict(assign=True)`: initialising transformers' CLIP models on
    the CPU costs seconds for nothing.
    """
    generator = torch.Generator().manual_seed(seed)
    names = ["unet", "vae", "clip_g"] + (["clip_l"] if config.clip_l is not None else [])
    modules = {}
    for name in names:
        module = build_component(name, config)
        state = {key: torch.randn(tuple(t.shape), generator=generator) * 0.05 + (1.0 if t.ndim == 1 else 0.0)
                 for key, t in module.state_dict().items()}
        module.load_state_dict(state, strict=True, assign=True)
        modules[name] = module.requires_grad_(False).eval()
    return SDXLModel(config=config, unet=modules["unet"], vae=modules["vae"], clip_g=modules["clip_g"],
                     clip_l=modules.get("clip_l"), tokenizer=SDXLTokenizer(), source=None, dtype=torch.float32)


def single_file_state(model: SDXLModel) -> dict[str, torch.Tensor]:
    """The model's weights under the single-file key names (no bookkeeping keys)."""
    prefixes = component_prefixes(model.kind)
    return {prefixes[name] + key: tensor for name, module in model.modules().items()
            for key, tensor in module.state_dict().items()}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# --- diffusers layouts (through diffusers' own ldm -> diffusers conversion) ------------------------------------------

def diffusers_unet_state(model: SDXLModel) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    config = {"layers_per_block": model.config.unet.num_res_blocks, "addition_embed_type": "text_time",
              "num_class_embeds": None}
    return convert_ldm_unet_checkpoint(state, config)


def diffusers_vae_state(vae) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    levels = len(vae.config.channel_mult)
    config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    return convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in vae.state_dict().items()}, config)


def diffusers_clip_g_state(model: SDXLModel) -> dict[str, torch.Tensor]:
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = "conditioner.embedders.1.model."
    state = {prefix + k: v for k, v in model.clip_g.state_dict().items()}
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=model.config.clip_g.hidden_size))
    return convert_open_clip_checkpoint(text_model, state, prefix=prefix)


def _unet_config_json(model: SDXLModel) -> dict:
    unet = model.config.unet
    return {"_class_name": "UNet2DConditionModel", "block_out_channels": list(unet.level_channels),
            "attention_head_dim": [w // unet.num_head_channels for w in unet.level_channels],
            "layers_per_block": unet.num_res_blocks, "norm_num_groups": unet.norm_groups,
            "transformer_layers_per_block": list(unet.transformer_depth), "cross_attention_dim": unet.context_dim}


def _write_sharded(folder: Path, name: str, tensors: dict[str, torch.Tensor], shards: int) -> None:
    keys = sorted(tensors)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    stem = name.removesuffix(".safetensors")
    for i in range(shards):
        shard_name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per_shard:(i + 1) * per_shard]}
        write_tensors(folder / shard_name, part)
        weight_map.update({k: shard_name for k in part})
    (folder / f"{name}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_diffusers_folder(model: SDXLModel, folder: Path, *, shards: int = 1,
                           dtype: torch.dtype | None = None) -> Path:
    """A diffusers pipeline folder of `model` (base: text_encoder + text_encoder_2; refiner: text_encoder_2 only)."""
    def cast(state: dict) -> dict:
        return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}

    base = model.kind == "base"
    parts = {
        "unet": ("diffusion_pytorch_model.safetensors", cast(diffusers_unet_state(model)), _unet_config_json(model)),
        "vae": ("diffusion_pytorch_model.safetensors", cast(diffusers_vae_state(model.vae)),
                {"_class_name": "AutoencoderKL", "norm_num_groups": model.config.vae.norm_groups}),
        "text_encoder_2": ("model.safetensors", cast(diffusers_clip_g_state(model)),
                           {"num_attention_heads": model.config.clip_g.num_heads}),
    }
    if base:
        parts["text_encoder"] = ("model.safetensors", cast(model.clip_l.state_dict()),
                                 {"num_attention_heads": model.config.clip_l.num_heads})
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline",
             "text_encoder": ["transformers", "CLIPTextModel"] if base else [None, None],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    for part, (name, state, config) in parts.items():
        (folder / part).mkdir(exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config))
        if shards > 1:
            _write_sharded(folder / part, name, state, shards)
        else:
            write_tensors(folder / part / name, state)
    return folder


def write_vae_file(vae, path: Path, *, layout: str = "original") -> Path:
    """A separate VAE file: original (ldm) names without prefix, or diffusers names."""
    state = vae.state_dict() if layout == "original" else diffusers_vae_state(vae)
    return write_tensors(path, state)


def write_checkpoint(model: SDXLModel, path: Path, dtype: torch.dtype | None = torch.float16) -> Path:
    save_checkpoint(model, path, dtype=dtype)
    return path


# --- files the loader must refuse ------------------------------------------------------------------------------------

def write_truncated(source: Path, path: Path, keep_fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def write_pickle(path: Path) -> Path:
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}}, path)
    return path


def write_sd15_like(path: Path) -> Path:
    """The probe keys and shapes of an SD 1.5 checkpoint (CLIP-L under cond_stage_model, 768-wide context)."""
    return write_tensors(path, {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 768),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    })


def write_sd2_like(path: Path) -> Path:
    """The probe keys and shapes of an SD 2.x checkpoint (OpenCLIP ViT-H under cond_stage_model.model)."""
    return write_tensors(path, {
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3072, 1024),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
    })


def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared, busy CPU the thread hand-offs dominate."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- full-size synthetic checkpoints (heavy tests) -------------------------------------------------------------------

def write_from_manifest(manifest: Path, path: Path, seed: int = 0) -> int:
    """A full-size random checkpoint with exactly the manifest's keys, shapes and dtypes; returns its weight bytes.

    Values are slices of one 64M-element random block (finite, small), so synthesis runs at disk speed instead of
    drawing billions of random numbers; `write_safetensors` streams them, one tensor in memory at a time.
    """
    from sdxl_core.checkpoints.files import LazyTensor, write_safetensors

    entries = json.loads(manifest.read_text())
    block = (torch.randn(1 << 26, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.float16)
    tensors, offset, total = {}, 0, 0
    for key, entry in entries.items():
        shape, dtype = tuple(entry["shape"]), getattr(torch, entry["dtype"])
        numel = int(torch.Size(shape).numel())
        if key.endswith("position_ids"):
            def loader():
                return torch.arange(77, dtype=torch.int64).reshape(1, 77)
        else:
            start = offset % (block.numel() - numel)
            offset += 7919  # vary where each tensor starts in the block
            def loader(s=start, n=numel, sh=shape, dt=dtype):
                return block[s:s + n].reshape(sh).to(dt)
        tensors[key] = LazyTensor(shape=shape, dtype=dtype, origin=key, loader=loader)
        total += numel * torch.empty((), dtype=dtype).element_size()
    write_safetensors(path, tensors)
    return total


def write_tiny_controlnet(path: Path, seed: int = 3) -> Path:
    """A ControlNet for the tiny base (random weights, zero convolutions included, so it visibly steers) as an
    original-layout single file (`control_model.` names), with the head width its shapes cannot show."""
    from sdxl_core.checkpoints.detect import HINT_UNET_HEAD_CHANNELS
    from sdxl_core.config import TINY_BASE_UNET
    from tests.models.test_controlnet import random_controlnet

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"control_model." + key: value for key, value in random_controlnet(seed=seed).state_dict().items()}
    return write_tensors(path, state, {HINT_UNET_HEAD_CHANNELS: str(TINY_BASE_UNET.num_head_channels)})
