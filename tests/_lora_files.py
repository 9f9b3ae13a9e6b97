"""LoRA files for the tests, in kohya's layout, named from the references' module paths (diffusers'
UNet2DConditionModel, transformers' CLIP read from the single-file state dicts), never from
sdxl_core.checkpoints.lora's mapping."""

import torch
from torch import nn

from sdxl_core.text.openclip_conversion import openclip_to_transformers

RANK = 4


def adaptable_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {path: layer for path, layer in module.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d))}


def lora_pair(shape: tuple, gen: torch.Generator, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) for a weight of `shape`; kohya LoCon for convs: kxk down, 1x1 up."""
    out_dim, in_dim, *kernel = shape
    down = torch.randn(rank, in_dim, *kernel, generator=gen) * 0.1
    up = torch.randn(out_dim, rank, *([1] * len(kernel)), generator=gen) * 0.1
    return up, down


def lora_delta(up: torch.Tensor, down: torch.Tensor, shape: tuple, factor: float) -> torch.Tensor:
    return factor * (up.flatten(1).double() @ down.flatten(1).double()).reshape(shape)


def text_modules(model) -> dict[str, dict[str, tuple]]:
    """transformers module path -> weight shape, per text encoder, read from the single-file state dicts."""
    encoders = {"clip_l": model.clip_l.state_dict()} if model.clip_l is not None else {}
    encoders["clip_g"] = openclip_to_transformers(model.clip_g.state_dict())
    return {component: {key[:-len(".weight")]: tuple(value.shape) for key, value in state.items()
                        if key.endswith(("proj.weight", "fc1.weight", "fc2.weight")) and value.ndim == 2
                        and "embeddings" not in key}
            for component, state in encoders.items()}


def kohya_lora(model, *, unet: bool = True, text: bool = True, alpha: float | None = 2.0, seed: int = 0,
               rank: int = RANK):
    """A kohya-format LoRA over every UNet Linear/Conv (diffusers names) and every text-encoder Linear."""
    from tests._diffusers_twins import diffusers_unet

    gen = torch.Generator().manual_seed(seed)
    state = {}

    def add(name, shape):
        up, down = lora_pair(shape, gen, rank)
        state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"] = up, down
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)

    if unet:
        for path, layer in adaptable_layers(diffusers_unet(model.unet)).items():
            add("lora_unet_" + path.replace(".", "_"), tuple(layer.weight.shape))
    if text:
        prefixes = {"clip_l": "lora_te1_", "clip_g": "lora_te2_" if model.clip_l is not None else "lora_te_"}
        for component, modules in text_modules(model).items():
            for path, shape in modules.items():
                add(prefixes[component] + path.replace(".", "_"), shape)
    return state
