"""sdxl_core.runtime.optimize: every lever computes the same function as the plain UNet (fp32, tiny configs) and a fused
UNet still speaks the checkpoint's state-dict layout."""

import math

import pytest
import torch
from torch import nn

from sdxl_core.config import TINY_BASE_UNET, TINY_REFINER_UNET
from sdxl_core.models.unet import Attention, UNetModel
from sdxl_core.runtime.optimize import (
    ATTENTION_BACKENDS,
    CUDAGraphStep,
    FusedCrossAttention,
    FusedSelfAttention,
    UNetOptimizations,
    attention_backend,
    compile_unet,
    fuse_qkv,
    is_compiled,
    is_qkv_fused,
    optimize_unet,
    to_channels_last,
    to_contiguous_format,
    unfuse_qkv,
    uses_channels_last,
)

CONFIGS = {"base": TINY_BASE_UNET, "refiner": TINY_REFINER_UNET}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CI machine thread oversubscription makes a
    0.1 s forward take seconds; restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights of unit-variance scale (default init leaves some outputs near zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif name.endswith("weight"):  # norms
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)
    return module.eval()


def _unet(kind: str, seed: int = 0) -> UNetModel:
    return _randomize(UNetModel(CONFIGS[kind]), seed)


def _inputs(kind: str, batch: int = 2, side: int = 16, seed: int = 1):
    config = CONFIGS[kind]
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, side, side, generator=gen), torch.tensor([999.0, 3.0][:batch]),
            torch.randn(batch, 77, config.context_dim, generator=gen),
            torch.randn(batch, config.adm_in_channels, generator=gen))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _run(unet, inputs):
    with torch.inference_mode():
        return unet(*inputs)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_fused_qkv_matches_plain_and_keeps_checkpoint_layout(kind):
    unet = _unet(kind)
    inputs = _inputs(kind)
    reference = _run(unet, inputs)
    original = {k: v.clone() for k, v in unet.state_dict().items()}

    swapped = fuse_qkv(unet)
    config = CONFIGS[kind]
    # Transformer blocks: num_res_blocks spatial transformers per level down, one more up, plus the middle one.
    depth = sum(config.transformer_depth) * (2 * config.num_res_blocks + 1) + config.transformer_depth_middle
    assert swapped == 2 * depth  # attn1 and attn2 of every transformer block
    assert is_qkv_fused(unet)
    assert not any(type(m) is Attention for m in unet.modules())
    assert sum(isinstance(m, FusedSelfAttention) for m in unet.modules()) == depth
    assert sum(isinstance(m, FusedCrossAttention) for m in unet.modules()) == depth

    err = _rel_err(_run(unet, inputs), reference)
    assert reference.abs().max() > 1e-2
    assert err <= 1e-5, f"fused QKV relative error {err:.3g}"

    saved = unet.state_dict()
    assert sorted(saved) == sorted(original)
    for key, value in original.items():
        assert saved[key].shape == value.shape, key
        assert torch.equal(saved[key], value), key
    assert not any("to_qkv" in k or "to_kv" in k for k in saved)


def test_fused_unet_loads_the_checkpoint_layout_strictly_and_on_meta():
    source = _unet("base", seed=3)
    inputs = _inputs("base")
    reference = _run(source, inputs)
    checkpoint = source.state_dict()

    fused = _unet("base", seed=9)  # different weights, then the checkpoint's
    fuse_qkv(fused)
    fused.load_state_dict(checkpoint, strict=True)
    assert _rel_err(_run(fused, inputs), reference) <= 1e-5

    # Fusion before the weights exist: build on meta, fuse, assign the checkpoint layout.
    meta = UNetModel(TINY_BASE_UNET, device="meta")
    fuse_qkv(meta)
    meta.load_state_dict(checkpoint, strict=True, assign=True)
    assert is_qkv_fused(meta)
    assert _rel_err(_run(meta.eval(), inputs), reference) <= 1e-5


def test_strict_load_of_a_partial_layout_reports_the_keys():
    unet = _unet("base")
    fuse_qkv(unet)
    checkpoint = unet.state_dict()
    broken = next(k for k in checkpoint if k.endswith("attn1.to_k.weight"))
    del checkpoint[broken]
    with pytest.raises(RuntimeError, match="to_qkv.weight"):
        unet.load_state_dict(checkpoint, strict=True)


def test_unfuse_restores_plain_modules_and_output():
    unet = _unet("refiner")
    inputs = _inputs("refiner")
    reference = _run(unet, inputs)
    keys = list(unet.state_dict())
    fuse_qkv(unet)
    assert unfuse_qkv(unet) == fuse_qkv(_unet("refiner"))
    assert not is_qkv_fused(unet)
    assert list(unet.state_dict()) == keys  # the module tree, and so the key order, is the original again
    assert torch.equal(_run(unet, inputs), reference)


def test_fused_attentions_refuse_the_wrong_call():
    unet = _unet("base")
    fuse_qkv(unet)
    self_attn = next(m for m in unet.modules() if isinstance(m, FusedSelfAttention))
    cross_attn = next(m for m in unet.modules() if isinstance(m, FusedCrossAttention))
    x = torch.randn(1, 5, self_attn.to_qkv.in_features)
    with pytest.raises(ValueError, match="no context"):
        self_attn(x, torch.randn(1, 3, x.shape[-1]))
    with pytest.raises(ValueError, match="needs the text context"):
        cross_attn(torch.randn(1, 5, cross_attn.to_q.in_features))


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_channels_last_matches_plain_and_is_reversible(kind):
    unet = _unet(kind)
    inputs = _inputs(kind, side=24)
    reference = _run(unet, inputs)
    to_channels_last(unet)
    assert uses_channels_last(unet)
    out = _run(unet, inputs)
    assert out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)
    err = _rel_err(out, reference)
    assert err <= 1e-5, f"channels_last relative error {err:.3g}"
    keys_before = sorted(_unet(kind).state_dict())
    assert sorted(unet.state_dict()) == keys_before
    to_contiguous_format(unet)
    assert not uses_channels_last(unet)


def test_all_eager_levers_together_match_plain():
    unet = _unet("base")
    inputs = _inputs("base", side=24)
    reference = _run(unet, inputs)
    step = optimize_unet(unet, UNetOptimizations(fuse_qkv=True, channels_last=True, attention="math"))
    assert step.unet is unet and is_qkv_fused(unet) and uses_channels_last(unet)
    assert _rel_err(step(*inputs), reference) <= 1e-5
    assert step.settings.label() == "fused-qkv+channels-last+attn:math"
    assert UNetOptimizations().label() == "eager"


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_attention_backend_context_keeps_the_output(backend):
    unet = _unet("base")
    inputs = _inputs("base")
    reference = _run(unet, inputs)
    with attention_backend(backend):
        out = _run(unet, inputs)
    assert _rel_err(out, reference) <= 1e-5


def test_attention_backend_is_enforced_not_silently_replaced():
    q = torch.randn(1, 2, 8, 16)
    with attention_backend("cudnn"), pytest.raises(RuntimeError, match="No (available kernel|viable backend)"):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # no cuDNN attention on the CPU
    with pytest.raises(ValueError, match="unknown attention backend"):
        with attention_backend("fastest"):
            pass
    assert set(ATTENTION_BACKENDS) == {"auto", "flash", "efficient", "cudnn", "math"}


def test_settings_validation():
    with pytest.raises(ValueError, match="unknown attention backend"):
        UNetOptimizations(attention="xformers")
    with pytest.raises(ValueError, match="already uses CUDA graphs"):
        UNetOptimizations(compile_mode="reduce-overhead", cuda_graph=True)
    with pytest.raises(ValueError, match="example inputs"):
        optimize_unet(_unet("base"), UNetOptimizations(compile_mode="default"))


def test_cuda_graphs_refuse_a_cpu_module_clearly():
    with pytest.raises(RuntimeError, match="need a module on a CUDA device; this one has parameters on cpu"):
        CUDAGraphStep(_unet("base"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_matches_eager_and_recaptures_after_a_move():
    unet = _unet("base").cuda()
    inputs = tuple(t.cuda() for t in _inputs("base"))
    reference = _run(unet, inputs)
    step = CUDAGraphStep(unet)
    assert _rel_err(step(*inputs), reference) <= 1e-5
    other = tuple(t.cuda() for t in _inputs("base", seed=5))
    assert _rel_err(step(*other), _run(unet, other)) <= 1e-5
    assert step.captures == 1
    unet.cpu().cuda()  # new weight addresses
    assert _rel_err(step(*inputs), reference) <= 1e-5
    assert step.captures == 2


def test_unet_traces_as_one_graph_with_every_eager_lever():
    """torch.compile's gain depends on capturing the whole step: a graph break (a shape check that reads a tensor,
    a host sync, an unsupported op) would split it and put launch gaps back. `fullgraph=True` makes any break an
    error; the "eager" backend traces without generating code, so this costs seconds, not minutes."""
    torch._dynamo.reset()
    unet = _unet("base")
    fuse_qkv(unet)
    to_channels_last(unet)
    inputs = _inputs("base")
    reference = _run(unet, inputs)
    traced = torch.compile(unet, backend="eager", fullgraph=True, dynamic=False)
    try:
        assert _rel_err(_run(traced, inputs), reference) <= 1e-6
    finally:
        torch._dynamo.reset()


@pytest.mark.heavy
def test_compile_keeps_output_and_layout():
    """torch.compile on the CPU needs a C++ compiler and tens of seconds: heavy tier."""
    unet = _unet("base")
    inputs = _inputs("base")
    reference = _run(unet, inputs)
    keys = list(unet.state_dict())
    report = compile_unet(unet, inputs)
    assert is_compiled(unet)
    assert list(unet.state_dict()) == keys
    assert report.first_call_s > report.steady_call_s and report.compile_s > 0
    assert _rel_err(_run(unet, inputs), reference) <= 1e-4


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_full_size_fused_unet_saves_the_checkpoint_layout(kind):
    """On meta (no memory): a fused full-size UNet's state dict has the published keys and shapes."""
    from sdxl_core.config import SDXL_BASE_UNET, SDXL_REFINER_UNET

    config = {"base": SDXL_BASE_UNET, "refiner": SDXL_REFINER_UNET}[kind]
    plain = {k: tuple(v.shape) for k, v in UNetModel(config, device="meta").state_dict().items()}
    fused_unet = UNetModel(config, device="meta")
    fuse_qkv(fused_unet)
    fused = {k: tuple(v.shape) for k, v in fused_unet.state_dict().items()}
    assert fused == plain
    assert sum(p.numel() for p in fused_unet.parameters()) == sum(
        p.numel() for p in UNetModel(config, device="meta").parameters())
