"""Areas and masks on conditioning: equal to ComfyUI's own resolve / mirror / get_area_and_mult / _calc_cond_batch
on a toy model whose output depends on the window it sees, plus the resolution rules on their own."""

import collections
import math
import types

import pytest
import torch

from sdxl_core.sampling.guidance import CFGDenoiser, WeightedConditioning
from sdxl_core.sampling.regions import Region, mirror_areas, resolve_region
from tests._comfyui_reference import lift, requires_comfyui
from tests.sampling.test_guidance import _cond

LATENT_HW = (16, 24)


class WindowModel:
    """x0 depends on x, sigma, the context and y, and on the mean of the whole input it is given (so that an
    entry's window matters); records the input sizes."""

    def __init__(self):
        self.shapes = []

    def __call__(self, x, sigma, context, y):
        self.shapes.append(tuple(x.shape))
        shift = context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + y.sum(dim=1).view(-1, 1, 1, 1)
        return x / (1 + sigma.view(-1, 1, 1, 1)) + shift + 0.3 * x.mean(dim=(2, 3), keepdim=True) ** 2


def soft_mask(batch=1, height=64, width=96, seed=0):
    mask = torch.zeros(batch, height, width)
    mask[:, 8:40, 30:90] = 1.0
    return (mask * torch.rand(batch, height, width, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


CASES = {
    "area": [({"area": (8, 12, 4, 6)}, 1.5), ({}, 1.0)],
    "edge-area-and-percentage": [({"area": (10, 30, 8, 0)}, 1.0), ({"area": ("percentage", 0.5, 0.5, 0.25, 0.5)}, 2.0)],
    "mask": [({"mask": soft_mask(), "mask_strength": 0.8}, 1.0), ({}, 0.5)],
    "mask-bounds": [({"mask": soft_mask(), "mask_strength": 1.2, "set_area_to_bounds": True}, 1.0), ({}, 1.0)],
    "mask-in-area": [({"mask": soft_mask(height=16, width=24), "area": (8, 8, 2, 2)}, 1.0),
                     ({"area": (12, 12, 0, 0)}, 0.7)],
}


def _entries(case, values):
    return [(options, strength, _cond(value)) for (options, strength), value in zip(case, values)]


def _ours(entries):
    return [WeightedConditioning(cond, strength=strength, region=resolve_region(options, LATENT_HW, "entry"))
            for options, strength, cond in entries]


def _comfy_functions():
    utils = lift("comfy/utils.py", "repeat_to_batch_size", "common_upscale")
    comfy_utils = types.SimpleNamespace(**utils)
    conds = lift("comfy/conds.py", "CONDRegular", "CONDCrossAttn",
                 namespace={"comfy": types.SimpleNamespace(utils=comfy_utils)})
    comfy = types.SimpleNamespace(hooks=types.SimpleNamespace(HookGroup=object), utils=comfy_utils)
    memory = types.SimpleNamespace(get_free_memory=lambda device: 1 << 40)
    samplers = lift("comfy/samplers.py", "get_area_and_mult", "add_area_dims", "cond_equal_size", "can_concat_cond",
                    "cond_cat", "_calc_cond_batch", "cfg_function", "resolve_areas_and_cond_masks_multidim",
                    "get_mask_aabb", "create_cond_with_same_area_if_none",
                    namespace={"collections": collections, "comfy": comfy, "model_management": memory,
                               "BaseModel": object})
    return conds, samplers


def _comfy_side(conds, entries, first_uuid):
    out = []
    for index, (options, strength, cond) in enumerate(entries):
        entry = {"model_conds": {"c_crossattn": conds["CONDCrossAttn"](cond["context"]),
                                 "y": conds["CONDRegular"](cond["y"])},
                 "uuid": first_uuid + index, "strength": strength, **options}
        out.append(entry)
    return out


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.parametrize("case", sorted(CASES))
def test_regions_match_comfyui(case):
    conds, samplers = _comfy_functions()
    positive = _entries(CASES[case], (1.0, 0.5))
    negative = [({}, 1.0, _cond(-1.0))]
    theirs = {"positive": _comfy_side(conds, positive, 0), "negative": _comfy_side(conds, negative, 10)}
    for side in theirs.values():
        samplers["resolve_areas_and_cond_masks_multidim"](side, LATENT_HW, "cpu")
    for k in theirs:  # process_conds: every area gets a twin on the other side
        for c in theirs[k]:
            for kk in theirs:
                if k != kk:
                    samplers["create_cond_with_same_area_if_none"](theirs[kk], c)

    toy = WindowModel()
    patcher = types.SimpleNamespace(prepare_hook_patches_current_keyframe=lambda *a: None,
                                    prepare_state=lambda t: None, apply_hooks=lambda hooks: {})
    comfy_model = types.SimpleNamespace(
        current_patcher=patcher, memory_required=lambda shape, cond_shapes=None: 0,
        apply_model=lambda x, t, c_crossattn, y, transformer_options: toy(x, t, c_crossattn, y))
    guided = CFGDenoiser(toy, _ours(positive), _ours(negative), cfg=3.5)
    assert len(guided.uncond) == len(theirs["negative"]) and len(guided.cond) == len(theirs["positive"])
    x = torch.randn(2, 4, *LATENT_HW, generator=torch.Generator().manual_seed(1))
    for value in (6.0, 1.0, 0.1):
        sigma = torch.full((2,), value)
        cond_pred, uncond_pred = samplers["_calc_cond_batch"](comfy_model, [theirs["positive"], theirs["negative"]],
                                                              x, sigma, {})
        expected = samplers["cfg_function"](None, cond_pred, uncond_pred, 3.5, x, sigma)
        ours = guided(x, sigma)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert any(shape[-2:] != LATENT_HW for shape in toy.shapes) or case.startswith("mask")


def test_area_entries_see_only_their_window_and_are_mirrored():
    model = WindowModel()
    positive = [WeightedConditioning(_cond(1.0), region=resolve_region({"area": (8, 8, 4, 4)}, LATENT_HW, "a")),
                WeightedConditioning(_cond(0.5))]
    guided = CFGDenoiser(model, positive, [WeightedConditioning(_cond(-1.0))], cfg=2.0)
    # The negative side got a twin of the area, with the negative's text.
    assert len(guided.uncond) == 2 and guided.uncond[1].region.area == (8, 8, 4, 4)
    assert torch.equal(guided.uncond[1].cond["context"], _cond(-1.0)["context"])
    x = torch.randn(1, 4, *LATENT_HW)
    out = guided(x, torch.tensor([1.0]))
    # The area and its twin share one call on the 8x8 window; the whole-latent entries one on the full latent.
    assert sorted(model.shapes) == [(2, 4, 8, 8), (2, 4, 16, 24)]
    # Far from the area only the whole-latent entries count: plain CFG of those two.
    plain = CFGDenoiser(WindowModel(), [WeightedConditioning(_cond(0.5))], [WeightedConditioning(_cond(-1.0))],
                        cfg=2.0)(x, torch.tensor([1.0]))
    torch.testing.assert_close(out[..., 14:, 14:], plain[..., 14:, 14:])
    assert (out[..., 6:10, 6:10] - plain[..., 6:10, 6:10]).abs().max() > 1e-3


def test_resolution_rules():
    assert resolve_region({"strength": 2.0}, LATENT_HW, "e") is None
    assert resolve_region({"area": ("percentage", 0.5, 0.25, 0.125, 0.5)}, LATENT_HW, "e").area == (8, 6, 2, 12)
    mask = torch.zeros(1, 64, 96)
    mask[:, 16:24, 8:16] = 1.0
    region = resolve_region({"mask": mask, "set_area_to_bounds": True}, LATENT_HW, "e")
    assert region.mask.shape == (1, *LATENT_HW)
    top, left = region.area[2], region.area[3]
    assert region.area[:2] == (8, 8) and 3 <= top <= 4 and 1 <= left <= 2  # bilinear blur widens the box a little
    assert resolve_region({"mask": torch.zeros(4, 4), "set_area_to_bounds": True}, LATENT_HW, "e").area == (8, 8, 0, 0)
    with pytest.raises(ValueError, match="does not overlap"):
        resolve_region({"area": (4, 4, 16, 0)}, LATENT_HW, "entry 0")
    with pytest.raises(ValueError, match=r"MASK \[height, width\]"):
        resolve_region({"mask": torch.zeros(1, 1, 4, 4)}, LATENT_HW, "entry 0")


def test_plain_area_edges_are_feathered_inside_the_latent_only():
    region = Region(area=(8, 8, 0, 8))
    view = region.view(torch.zeros(1, 1, 16, 24), strength=2.0)
    weight = view.weight[0, 0]
    assert view.window == (0, 8, 8, 8)
    assert weight[0, 4].item() == 2.0  # the top edge is the latent's: no ramp
    assert weight[4, 0].item() == pytest.approx(2.0 * 0.5)  # left edge inside: ramp over 8 // 4 = 2 cells
    assert weight[7, 4].item() == pytest.approx(2.0 * 0.5)  # bottom edge inside
    assert math.isclose(weight[4, 4].item(), 2.0)


def test_mirror_keeps_an_existing_equal_area():
    area = {"area": (8, 8, 0, 0)}
    a = WeightedConditioning(_cond(1.0), region=resolve_region(area, LATENT_HW, "a"))
    b = WeightedConditioning(_cond(-1.0), region=resolve_region(area, LATENT_HW, "b"))
    cond, uncond = mirror_areas([[a], [b]])
    assert cond == [a] and uncond == [b]


def test_regional_prompt_through_the_pipeline(tiny_base):
    from sdxl_core.pipeline import encode_base_conditioning
    from tests._sampling_helpers import sample_with

    background, subject = encode_base_conditioning(tiny_base, "a meadow"), encode_base_conditioning(tiny_base, "a fox")
    negative = encode_base_conditioning(tiny_base, "blurry")
    regional = background + [[subject[0][0], {**subject[0][1], "area": (4, 4, 4, 4), "strength": 1.0,
                                              "set_area_to_bounds": False}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    settings = dict(seed=3, steps=3, cfg=5.0, sampler="euler", scheduler="normal")
    out = sample_with(tiny_base, latent, regional, negative, **settings)["samples"]
    plain = sample_with(tiny_base, latent, background, negative, **settings)["samples"]
    assert torch.isfinite(out).all()
    assert (out[..., 4:, 4:] - plain[..., 4:, 4:]).abs().max() > 1e-3
