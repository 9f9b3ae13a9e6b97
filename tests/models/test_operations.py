"""Storage precision apart from compute precision: manual casting, the injectable layer namespace, the load rule."""

import copy

import pytest
import torch
from torch import nn

from sdxl_core.checkpoints.loading import load_checkpoint, open_checkpoint, save_checkpoint, storage_dtype_for
from sdxl_core.checkpoints.lora import apply_lora
from sdxl_core.config import TINY_BASE
from sdxl_core.models.unet import UNetModel
from sdxl_core.models.vae import AutoencoderKL
from sdxl_core.operations import LAYER_TYPES, manual_cast, use_operations
from sdxl_core.pipeline import GenerationRequest, generate
from sdxl_core.text.encoders import TextEncoder
from tests._lora_files import kohya_lora

REQUEST = GenerationRequest(prompt="a lighthouse", negative="blurry", width=64, height=64, steps=4,
                            refiner_start=3, cfg=5.0, seed=7)


def _networks(model):
    return {name: module for name, module in model.modules().items()}


def test_an_fp16_file_on_the_cpu_is_held_in_fp16_and_gives_the_fp32_bits(tiny_checkpoints):
    """The default: fp16 weights, fp32 compute, layer by layer; fp16 -> fp32 is exact, so nothing changes."""
    held = [load_checkpoint(tiny_checkpoints[kind]) for kind in ("base", "refiner")]
    full = [load_checkpoint(tiny_checkpoints[kind], storage_dtype=torch.float32) for kind in ("base", "refiner")]
    for model in held:
        assert model.dtype == torch.float32
        for name, module in _networks(model).items():
            assert {p.dtype for p in module.parameters()} == {torch.float16}, name
            assert module.compute_dtype == torch.float32 and module.operations is manual_cast
    for model in full:
        assert all(module.operations is None and {p.dtype for p in module.parameters()} == {torch.float32}
                   for module in _networks(model).values())
    weights = [sum(p.numel() * p.element_size() for m in _networks(model).values() for p in m.parameters())
               for model in (*held, *full)]
    assert weights[0] * 2 == weights[2] and weights[1] * 2 == weights[3]
    a, b = generate(*held, REQUEST), generate(*full, REQUEST)
    assert torch.equal(a.latent["samples"], b.latent["samples"]) and torch.equal(a.images, b.images)


def test_fp16_storage_of_an_fp32_file_rounds_the_weights_by_a_measured_amount(tiny_base, tmp_path):
    """The mixed mode proper: an fp32 file held in bf16 or fp16 changes the weights, so the result moves a little."""
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(tiny_base, path, dtype=torch.float32)
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=4, refiner_start=4, cfg=5.0, seed=7)
    reference = generate(load_checkpoint(path), None, request).latent["samples"]
    assert load_checkpoint(path).unet.operations is None  # fp32 file, fp32 compute: plain layers, as before
    scale = reference.abs().max()
    for storage, bound in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        model = load_checkpoint(path, storage_dtype=storage)
        assert next(model.unet.parameters()).dtype == storage and model.unet.compute_dtype == torch.float32
        latent = generate(model, None, request).latent["samples"]
        relative = float((latent - reference).abs().max() / scale)
        print(f"{storage} storage: max |latent difference| {relative:.2e} of the largest latent value")
        assert 0 < relative < bound, (storage, relative)


@pytest.mark.parametrize("name", sorted(LAYER_TYPES))
def test_each_manual_cast_layer_computes_what_the_fp32_layer_computes(name):
    torch.manual_seed(0)
    plain = {"Linear": lambda: nn.Linear(8, 6), "Conv2d": lambda: nn.Conv2d(4, 6, 3, padding=1),
             "GroupNorm": lambda: nn.GroupNorm(2, 4), "LayerNorm": lambda: nn.LayerNorm(8),
             "Embedding": lambda: nn.Embedding(10, 8)}[name]()
    x = {"Linear": torch.randn(3, 8), "Conv2d": torch.randn(2, 4, 5, 5), "GroupNorm": torch.randn(2, 4, 5, 5),
         "LayerNorm": torch.randn(3, 8), "Embedding": torch.tensor([[1, 7, 3]])}[name]
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_((p + 0.1).half().float())  # values fp16 holds exactly; shifted so norm affines are not trivial
    stored = copy.deepcopy(plain).half()
    holder = nn.Sequential(stored)
    use_operations(holder, manual_cast, torch.float32)
    assert type(stored) is getattr(manual_cast, name) and stored.weight.dtype == torch.float16
    got, want = holder(x), plain(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)


class _Counting:
    """A foreign namespace shaped like ComfyUI's comfy.ops: subclasses of the torch layers, class-level flags."""

    calls: dict[str, int] = {}


def _counting(base):
    class Layer(base):
        comfy_cast_weights = True

        def forward(self, *args):
            _Counting.calls[base.__name__] = _Counting.calls.get(base.__name__, 0) + 1
            return manual_cast.__dict__[base.__name__].forward(self, *args)

    Layer.__name__ = base.__name__
    return Layer


for _name, _base in LAYER_TYPES.items():
    setattr(_Counting, _name, _counting(_base))


def test_every_network_takes_an_injected_namespace(tiny_checkpoints):
    """What the ComfyUI nodes do with comfy.ops: every layer of UNet, VAE and both text encoders runs through it."""
    _Counting.calls = {}
    injected = open_checkpoint(tiny_checkpoints["base"], operations=_Counting)
    for name, module in _networks(injected).items():
        kinds = {type(m) for m in module.modules()} & set(LAYER_TYPES.values())
        assert not kinds, f"{name} still has plain torch layers: {kinds}"
    ours = generate(load_checkpoint(tiny_checkpoints["base"]), None, REQUEST)
    theirs = generate(injected, None, REQUEST)
    assert set(_Counting.calls) == set(LAYER_TYPES)
    assert torch.equal(ours.images, theirs.images)


def test_a_namespace_without_the_torch_layers_is_refused_in_a_sentence():
    class Incomplete:
        Linear = manual_cast.Linear

    with pytest.raises(TypeError, match="needs a Conv2d class derived from torch.nn.Conv2d"):
        UNetModel(TINY_BASE.unet, device="meta", operations=Incomplete)
    for build in (lambda: AutoencoderKL(TINY_BASE.vae, device="meta", operations=torch.nn),
                  lambda: TextEncoder(TINY_BASE.clip_g, device="meta", operations=None)):
        assert build().operations is None  # torch.nn itself, or nothing: the plain layers


def test_the_storage_rule_keeps_only_what_converts_exactly():
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert storage_dtype_for(f16, f32, None) == f16 and storage_dtype_for(bf16, f32, None) == bf16
    assert storage_dtype_for(f32, f32, None) == f32 and storage_dtype_for(f32, f16, None) == f16
    assert storage_dtype_for(bf16, f16, None) == f16  # bf16 -> fp16 rounds: held in the compute dtype instead
    assert storage_dtype_for(f32, f32, bf16) == bf16  # asked for explicitly
    if hasattr(torch, "float8_e4m3fn"):
        assert storage_dtype_for(torch.float8_e4m3fn, f16, None) == torch.float8_e4m3fn


def test_a_lora_merged_into_fp16_storage_keeps_computing_in_fp32(tiny_checkpoints):
    model = load_checkpoint(tiny_checkpoints["base"])
    merged = apply_lora(model, kohya_lora(model), 0.5)
    for name in ("unet", "clip_g", "clip_l"):
        network = merged.component(name)
        assert network is not model.component(name)
        assert network.operations is manual_cast and network.compute_dtype == torch.float32
    assert generate(merged, None, REQUEST).images.dtype == torch.float32
