import pytest
import torch

from sdxl_core.sampling.denoiser import EpsDenoiser
from sdxl_core.sampling.guidance import CFGDenoiser, WeightedConditioning, can_batch, concat_conditioning
from sdxl_core.sampling.schedules import DiscreteSchedule
from tests._comfyui_reference import lift, requires_comfyui

SCHEDULE = DiscreteSchedule()


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


def _single(model, x, sigma, cond):
    return model(x, sigma, **{k: v.expand(x.shape[0], *v.shape[1:]) for k, v in cond.items()})


def test_several_entries_average_by_strength_in_one_call():
    """ComfyUI ConditioningCombine: a side's x0 is Σ strength·x0_i / Σ strength, every entry in the same call."""
    model = ContextModel()
    a, b, uncond = _cond(1.0), _cond(0.5, tokens=154), _cond(-2.0)
    cond = [WeightedConditioning(a, strength=1.0), WeightedConditioning(b, strength=3.0)]
    x, sigma = torch.randn(2, 4, 4, 4), torch.tensor([3.0, 3.0])
    guided = CFGDenoiser(model, cond, [WeightedConditioning(uncond)], cfg=5.0)(x, sigma)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 6
    assert model.calls[0]["context"].shape == (6, 154, 8)
    reference = ContextModel()
    xa, xb, xu = (_single(reference, x, sigma, c) for c in (a, b, uncond))
    expected_cond = (xa * 1.0 + xb * 3.0) / 4.0
    torch.testing.assert_close(guided, xu + (expected_cond - xu) * 5.0, rtol=0, atol=1e-6)
    # cfg 1 runs the positive entries alone, still in one call.
    model.calls.clear()
    alone = CFGDenoiser(model, cond, None, cfg=1.0)(x, sigma)
    assert [call["batch"] for call in model.calls] == [4]
    torch.testing.assert_close(alone, expected_cond, rtol=0, atol=1e-6)


def test_entries_too_different_in_length_split_into_as_few_calls_as_needed():
    model = ContextModel()
    uncond, long, short = _cond(-1.0), _cond(2.0, tokens=77 * 5), _cond(3.0)
    x, sigma = torch.randn(1, 4, 4, 4), torch.tensor([1.0])
    guided = CFGDenoiser(model, [WeightedConditioning(long), WeightedConditioning(short, strength=2.0)], uncond,
                         cfg=2.0)(x, sigma)
    # The short positive joins the negative's call (as ComfyUI batches whatever can_concat), the long one runs alone.
    assert [(call["batch"], call["context"].shape[1]) for call in model.calls] == [(2, 77), (1, 385)]
    xl, xs, xu = (_single(ContextModel(), x, sigma, c) for c in (long, short, uncond))
    torch.testing.assert_close(guided, xu + ((xl + 2.0 * xs) / 3.0 - xu) * 2.0, rtol=0, atol=1e-6)


def test_one_entry_is_passed_through_untouched_whatever_its_strength():
    model = ContextModel()
    x, sigma = torch.randn(1, 4, 4, 4), torch.tensor([2.0])
    plain = CFGDenoiser(model, _cond(1.0), _cond(-1.0), cfg=3.0)(x, sigma)
    weighted = CFGDenoiser(model, [WeightedConditioning(_cond(1.0), strength=0.25)], _cond(-1.0), cfg=3.0)(x, sigma)
    assert torch.equal(plain, weighted)
    with pytest.raises(ValueError, match="finite number >= 0"):
        WeightedConditioning(_cond(1.0), strength=-1.0)
    with pytest.raises(ValueError, match="non-empty list"):
        CFGDenoiser(model, [], _cond(-1.0), cfg=3.0)


def test_entries_apply_only_inside_their_sigma_range_and_an_empty_side_predicts_zero():
    """ComfyUI `get_area_and_mult` skips an entry when sigma > timestep_start or sigma < timestep_end; a side
    with nothing left accumulates nothing over a 1e-37 count, i.e. predicts x0 = 0."""
    model = ContextModel()
    early, late, uncond = _cond(1.0), _cond(4.0), _cond(-1.0)
    cond = [WeightedConditioning(early, sigma_end=2.0), WeightedConditioning(late, sigma_start=2.0, sigma_end=0.5)]
    guided = CFGDenoiser(model, cond, uncond, cfg=3.0)
    x = torch.randn(1, 4, 4, 4)
    for sigma, active in ((5.0, early), (2.0, None), (1.0, late)):
        model.calls.clear()
        s = torch.tensor([sigma])
        xu = _single(ContextModel(), x, s, uncond)
        xc = ((_single(ContextModel(), x, s, early) + _single(ContextModel(), x, s, late)) / 2 if active is None
              else _single(ContextModel(), x, s, active))
        torch.testing.assert_close(guided(x, s), xu + (xc - xu) * 3.0, rtol=0, atol=1e-6)
    model.calls.clear()
    s = torch.tensor([0.1])
    out = guided(x, s)
    assert [call["batch"] for call in model.calls] == [1]  # the negative alone
    xu = _single(ContextModel(), x, s, uncond)
    torch.testing.assert_close(out, xu + (torch.zeros_like(x) - xu) * 3.0, rtol=0, atol=1e-6)


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


@requires_comfyui
@pytest.mark.comfyui
def test_weighted_entries_match_comfyuis_calc_cond_batch():
    """Several entries per side, strengths and sigma ranges against ComfyUI's own `_calc_cond_batch` +
    `cfg_function`, driven through a toy model (no areas, masks, hooks or ControlNet)."""
    import collections
    import types

    utils = lift("comfy/utils.py", "repeat_to_batch_size")
    conds = lift("comfy/conds.py", "CONDRegular", "CONDCrossAttn",
                 namespace={"comfy": types.SimpleNamespace(utils=types.SimpleNamespace(**utils))})
    comfy = types.SimpleNamespace(hooks=types.SimpleNamespace(HookGroup=object))
    memory = types.SimpleNamespace(get_free_memory=lambda device: 1 << 40)
    samplers = lift("comfy/samplers.py", "get_area_and_mult", "cond_equal_size", "can_concat_cond", "cond_cat",
                    "_calc_cond_batch", "cfg_function",
                    namespace={"collections": collections, "comfy": comfy, "model_management": memory,
                               "BaseModel": object, "add_area_dims": None})

    toy = ContextModel()
    patcher = types.SimpleNamespace(prepare_hook_patches_current_keyframe=lambda *a: None,
                                    prepare_state=lambda t: None, apply_hooks=lambda hooks: {})
    comfy_model = types.SimpleNamespace(
        current_patcher=patcher, memory_required=lambda shape, cond_shapes=None: 0,
        apply_model=lambda x, t, c_crossattn, y, transformer_options: toy(x, t, c_crossattn, y))

    a, b, c, u = _cond(1.0), _cond(0.5, tokens=154), _cond(2.5), _cond(-1.0)
    ours = {"cond": [WeightedConditioning(a, strength=1.0), WeightedConditioning(b, strength=3.0, sigma_start=4.0),
                     WeightedConditioning(c, strength=0.5, sigma_end=1.0)],
            "uncond": [WeightedConditioning(u, sigma_end=0.5)]}

    def comfy_entry(entry, index):
        out = {"model_conds": {"c_crossattn": conds["CONDCrossAttn"](entry.cond["context"]),
                               "y": conds["CONDRegular"](entry.cond["y"])},
               "uuid": index, "strength": entry.strength}
        if entry.sigma_start != float("inf"):
            out["timestep_start"] = entry.sigma_start
        if entry.sigma_end != 0.0:
            out["timestep_end"] = entry.sigma_end
        return out

    theirs = [[comfy_entry(e, i) for i, e in enumerate(ours["cond"])],
              [comfy_entry(e, 10 + i) for i, e in enumerate(ours["uncond"])]]
    guided = CFGDenoiser(toy, ours["cond"], ours["uncond"], cfg=4.0)
    x = torch.randn(2, 4, 4, 4)
    for value in (8.0, 4.0, 2.0, 0.7, 0.2):
        sigma = torch.full((2,), value)
        cond_pred, uncond_pred = samplers["_calc_cond_batch"](comfy_model, theirs, x, sigma, {})
        expected = samplers["cfg_function"](None, cond_pred, uncond_pred, 4.0, x, sigma)
        torch.testing.assert_close(guided(x, sigma), expected, rtol=1e-6, atol=1e-6)
