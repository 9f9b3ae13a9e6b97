import pytest
import torch

from sdxl_core.denoiser import EpsDenoiser
from sdxl_core.guidance import CFGDenoiser, can_batch, concat_conditioning
from sdxl_core.schedules import DiscreteEpsSchedule
from tests._comfyui_reference import lift, requires_comfyui

SCHEDULE = DiscreteEpsSchedule()


class ContextModel:
    """A toy conditional denoiser: x0 depends on x, sigma, the mean of the context tokens and y; records calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context, y):
        self.calls.append({"batch": x.shape[0], "sigma": sigma.clone(), "context": context, "y": y})
        shift = context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + y.sum(dim=1).view(-1, 1, 1, 1)
        return x / (1 + sigma.view(-1, 1, 1, 1)) + shift


def _cond(value, tokens=77, batch=1):
    return {"context": torch.full((batch, tokens, 8), float(value)), "y": torch.full((batch, 4), float(value))}


def test_one_batched_call_uncond_first_and_cfg_on_x0():
    model = ContextModel()
    cond, uncond = _cond(1.0), _cond(-2.0)
    x, sigma = torch.randn(2, 4, 4, 4), torch.tensor([3.0, 3.0])
    guided = CFGDenoiser(model, cond, uncond, cfg=7.5)(x, sigma)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["batch"] == 4 and call["sigma"].tolist() == [3.0] * 4
    assert call["context"][:2].eq(-2.0).all() and call["context"][2:].eq(1.0).all()  # uncond first, like ComfyUI
    assert call["y"].shape == (4, 4)
    reference = ContextModel()
    c, u = reference(x, sigma, **{k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}), reference(
        x, sigma, **{k: v.expand(2, *v.shape[1:]) for k, v in uncond.items()})
    assert torch.allclose(guided, u + (c - u) * 7.5)


def test_cfg_one_skips_the_unconditional_pass():
    model = ContextModel()
    x, sigma = torch.randn(3, 4, 4, 4), torch.tensor(2.0)
    out = CFGDenoiser(model, _cond(1.0), _cond(-2.0), cfg=1.0)(x, sigma)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 3
    assert model.calls[0]["context"].eq(1.0).all()
    assert torch.equal(out, ContextModel()(x, torch.full((3,), 2.0), **{k: v.expand(3, *v.shape[1:])
                                                                          for k, v in _cond(1.0).items()}))
    CFGDenoiser(model, _cond(1.0), None, cfg=1.0)(x, sigma)  # no negative needed at cfg 1
    with pytest.raises(ValueError, match="needs an unconditional"):
        CFGDenoiser(model, _cond(1.0), None, cfg=5.0)


def test_different_token_lengths_repeat_to_their_lcm():
    model = ContextModel()
    cond, uncond = _cond(1.0, tokens=154), _cond(-2.0, tokens=77)
    CFGDenoiser(model, cond, uncond, cfg=4.0)(torch.randn(1, 4, 4, 4), torch.tensor([1.0]))
    context = model.calls[0]["context"]
    assert context.shape == (2, 154, 8)
    merged = concat_conditioning({"context": torch.arange(2 * 8.0).view(1, 2, 8)},
                                 {"context": torch.arange(3 * 8.0).view(1, 3, 8)})["context"]
    assert merged.shape == (2, 6, 8)
    assert torch.equal(merged[0], torch.arange(2 * 8.0).view(2, 8).repeat(3, 1))
    assert torch.equal(merged[1], torch.arange(3 * 8.0).view(3, 8).repeat(2, 1))


def test_too_different_token_lengths_run_as_two_calls():
    model = ContextModel()
    cond, uncond = _cond(1.0, tokens=77 * 5), _cond(-2.0, tokens=77)
    assert not can_batch(cond, uncond)
    x, sigma = torch.randn(1, 4, 4, 4), torch.tensor([1.0])
    out = CFGDenoiser(model, cond, uncond, cfg=3.0)(x, sigma)
    assert [call["context"].shape[1] for call in model.calls] == [77, 385]
    u, c = ContextModel()(x, sigma, **uncond), ContextModel()(x, sigma, **cond)
    assert torch.allclose(out, u + (c - u) * 3.0)


def test_repeating_context_tokens_leaves_attention_unchanged():
    torch.manual_seed(0)
    q, context = torch.randn(1, 16, 32), torch.randn(1, 77, 32)
    once = torch.nn.functional.scaled_dot_product_attention(q, context, context)
    thrice = torch.nn.functional.scaled_dot_product_attention(q, context.repeat(1, 3, 1), context.repeat(1, 3, 1))
    assert torch.allclose(once, thrice, atol=1e-6)


def test_batch_expansion_and_bad_conditioning():
    model = ContextModel()
    x = torch.randn(3, 4, 4, 4)
    CFGDenoiser(model, _cond(1.0, batch=3), _cond(0.0), cfg=2.0)(x, torch.tensor(1.0))
    assert model.calls[0]["context"].shape == (6, 77, 8)
    with pytest.raises(ValueError, match="expected 1 or the latent batch 3"):
        CFGDenoiser(model, _cond(1.0, batch=2), _cond(0.0), cfg=2.0)(x, torch.tensor(1.0))
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(model, _cond(1.0), {"context": torch.zeros(1, 77, 8)}, cfg=2.0)
    bad = _cond(0.0)
    bad["y"] = torch.zeros(1, 5)
    with pytest.raises(ValueError, match="'y' differs in shape"):
        CFGDenoiser(model, _cond(1.0), bad, cfg=2.0)(x, torch.tensor(1.0))


def test_cfg_on_x0_equals_cfg_on_eps():
    def eps_model(x_in, t, context, y):
        return torch.tanh(x_in) * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + y.mean(dim=1).view(-1, 1, 1, 1)

    denoiser = EpsDenoiser(eps_model, SCHEDULE)
    x, sigma = torch.randn(1, 4, 4, 4), SCHEDULE.sigmas[[500]]
    guided = CFGDenoiser(denoiser, _cond(1.0), _cond(-1.0), cfg=5.0)(x, sigma)
    x_in = x / (sigma**2 + 1) ** 0.5
    eps_c, eps_u = eps_model(x_in, None, **_cond(1.0)), eps_model(x_in, None, **_cond(-1.0))
    assert torch.allclose(guided, x - sigma * (eps_u + (eps_c - eps_u) * 5.0), atol=1e-5)


@requires_comfyui
@pytest.mark.comfyui
def test_cfg_and_context_concat_bit_equal_to_comfyui():
    import types

    conds = lift("comfy/conds.py", "CONDRegular", "CONDCrossAttn",
                 namespace={"comfy": types.SimpleNamespace(utils=None)})
    a, b = torch.randn(1, 154, 8), torch.randn(1, 77, 8)
    expected = conds["CONDCrossAttn"](b).concat([conds["CONDCrossAttn"](a)])
    assert torch.equal(concat_conditioning({"context": b}, {"context": a})["context"], expected)
    assert conds["CONDCrossAttn"](b).can_concat(conds["CONDCrossAttn"](torch.randn(1, 77 * 5, 8))) is False

    cfg_function = lift("comfy/samplers.py", "cfg_function")["cfg_function"]
    model = ContextModel()
    x, sigma = torch.randn(2, 4, 4, 4), torch.tensor([2.0, 2.0])
    ours = CFGDenoiser(model, _cond(1.0), _cond(-1.0), cfg=6.5)(x, sigma)
    out = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **concat_conditioning(
        {k: v.expand(2, *v.shape[1:]) for k, v in _cond(-1.0).items()},
        {k: v.expand(2, *v.shape[1:]) for k, v in _cond(1.0).items()}))
    assert torch.equal(ours, cfg_function(None, out[2:], out[:2], 6.5, x, sigma))
