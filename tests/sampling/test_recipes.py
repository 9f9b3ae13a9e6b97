"""The published sampling recipes of docs/sampling-recipes.md, each run end to end on the tiny base: the text-to-image
pipeline with the recipe's sampler, scheduler, steps, CFG, prediction type and RescaleCFG gives finite images after
the expected UNet calls (one latent row per call at CFG 1, two above), the command line reaches the same settings,
and with COMFYUI_PATH the latent equals ComfyUI's KSampler path (its ModelSamplingDiscrete, RescaleCFG, schedulers
and samplers) on the same UNet. The table in the doc is checked against this one, so the two cannot drift."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdxl_core.checkpoints.loading import load_checkpoint
from sdxl_core.pipeline import GenerationRequest, encode_base_conditioning, generate
from sdxl_core.sampling.noise import prepare_noise
from tests._comfyui_reference import requires_comfyui

DOC = Path(__file__).resolve().parents[2] / "docs" / "sampling-recipes.md"


@dataclass(frozen=True)
class Recipe:
    title: str  # the first cell of its row in docs/sampling-recipes.md
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    prediction: str = "eps"
    zsnr: bool = False
    rescale_cfg: float = 0.0
    size: int = 64  # pixels; the tiny models run any size, the doc gives the model's own


RECIPES = [
    Recipe("LCM / LCM-LoRA", "lcm", "sgm_uniform", 4, 1.5),
    Recipe("SDXL-Lightning", "euler", "sgm_uniform", 4, 1.0),
    Recipe("Hyper-SD (N-step LoRA)", "euler", "sgm_uniform", 8, 1.0),
    Recipe("DMD2", "lcm", "sgm_uniform", 4, 1.0),
    Recipe("SDXL-Turbo", "euler_ancestral", "sgm_uniform", 1, 1.0),
    Recipe("Pony / Illustrious (eps)", "euler_ancestral", "normal", 25, 7.0),
    Recipe("NoobAI-XL V-Pred", "euler", "normal", 28, 4.5, "v_prediction", True, 0.7),
]
SEED = 11


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
    """The tiny base as written (eps), and with ComfyUI's v_pred + ztsnr markers (the NoobAI-XL V-Pred files)."""
    base = tiny_checkpoints["base"]
    with safe_open(str(base), "pt") as handle:
        metadata = handle.metadata()
    marked = tmp_path_factory.mktemp("recipes") / "vpred_zsnr.safetensors"
    save_file({**load_file(str(base)), "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(marked),
              metadata=metadata)
    return {False: base, True: marked}


def _model(checkpoints, recipe: Recipe):
    model = load_checkpoint(checkpoints[recipe.prediction == "v_prediction"], dtype=torch.float32)
    # The prediction type comes from the file's markers, as a user's NoobAI-XL file would give it.
    assert (model.config.prediction, model.config.noise_schedule.zsnr) == (recipe.prediction, recipe.zsnr)
    return model


def _request(recipe: Recipe) -> GenerationRequest:
    return GenerationRequest(prompt="a red cube", negative="blurry", width=recipe.size, height=recipe.size,
                             steps=recipe.steps, refiner_start=recipe.steps, cfg=recipe.cfg, sampler=recipe.sampler,
                             scheduler=recipe.scheduler, seed=SEED, rescale_cfg=recipe.rescale_cfg)


def _count_rows(model, monkeypatch) -> list[int]:
    rows = []
    forward = model.unet.forward

    def counting(x, *args, **kwargs):
        rows.append(x.shape[0])
        return forward(x, *args, **kwargs)
    monkeypatch.setattr(model.unet, "forward", counting)
    return rows


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.title)
def test_recipe_runs_end_to_end_with_the_expected_unet_calls(checkpoints, recipe, monkeypatch):
    model = _model(checkpoints, recipe)
    rows = _count_rows(model, monkeypatch)
    result = generate(model, None, _request(recipe))
    # One UNet call per step for these one-evaluation samplers; CFG 1 skips the unconditional row, as ComfyUI does.
    assert rows == [1 if recipe.cfg == 1.0 else 2] * recipe.steps
    assert result.images.shape == (1, recipe.size, recipe.size, 3) and torch.isfinite(result.images).all()
    assert torch.isfinite(result.latent["samples"]).all()
    assert (result.parameters["prediction"], result.parameters["zsnr"]) == (recipe.prediction, recipe.zsnr)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.title)
def test_the_command_line_reaches_the_recipe(recipe):
    from sdxl_core.app import defaults
    from sdxl_core.app.cli import build_parser
    from sdxl_core.app.options import _request_from_args

    parser = build_parser().subcommand_parsers["generate"]
    argv = ["--base", "x.safetensors", "--prompt", "a red cube", "--negative", "blurry", "--out", "x.png",
            "--width", str(recipe.size), "--height", str(recipe.size), "--steps", str(recipe.steps),
            "--refiner-start", str(recipe.steps), "--cfg", str(recipe.cfg), "--sampler", recipe.sampler,
            "--scheduler", recipe.scheduler, "--seed", str(SEED), "--rescale-cfg", str(recipe.rescale_cfg)]
    if recipe.prediction != "eps":
        argv += ["--prediction", recipe.prediction] + (["--zsnr"] if recipe.zsnr else [])
    request = _request_from_args(parser.parse_args(argv), parser, defaults.FULL)
    expected = _request(recipe)
    assert request.sampling == expected.sampling
    assert (request.prediction, request.zsnr) == ((recipe.prediction, recipe.zsnr) if recipe.prediction != "eps"
                                                  else (None, None))


def _doc_rows() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| Model"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0].replace("**", "")] = cells
    return rows


def test_the_doc_table_gives_these_recipes():
    """docs/sampling-recipes.md's table: | model | prediction | sampler | scheduler | steps | CFG | RescaleCFG | ..."""
    rows = _doc_rows()
    assert set(rows) == {recipe.title for recipe in RECIPES}
    for recipe in RECIPES:
        cells = rows[recipe.title]
        prediction = recipe.prediction + (" + zsnr" if recipe.zsnr else "")
        assert cells[1] == f"`{prediction}`", (recipe.title, cells[1])
        assert cells[2] == f"`{recipe.sampler}`" and cells[3] == f"`{recipe.scheduler}`", recipe.title
        assert str(recipe.steps) in re.findall(r"\d+", cells[4]), (recipe.title, cells[4])
        assert f"{recipe.cfg:g}" in re.findall(r"\d+(?:\.\d+)?", cells[5]), (recipe.title, cells[5])
        assert cells[6] == (f"{recipe.rescale_cfg:g}" if recipe.rescale_cfg else "—"), (recipe.title, cells[6])


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.title)
def test_recipe_equals_comfyuis_ksampler(checkpoints, recipe):
    from tests._comfyui_ksampler import comfyui_ksampler

    model = _model(checkpoints, recipe)
    request = _request(recipe)
    result = generate(model, None, request)
    micro = request.base_micro_conditioning()
    positive, negative = (encode_base_conditioning(model, text, micro=micro) for text in ("a red cube", "blurry"))
    latent = recipe.size // 8
    expected, guided = comfyui_ksampler(
        model, positive, negative, prepare_noise((1, 4, latent, latent), SEED), sampler=recipe.sampler,
        scheduler=recipe.scheduler, steps=recipe.steps, cfg=recipe.cfg, seed=SEED, prediction=recipe.prediction,
        zsnr=recipe.zsnr, rescale=recipe.rescale_cfg or None)
    assert torch.equal(result.latent["samples"], expected), (result.latent["samples"] - expected).abs().max().item()
    assert guided.rows == [1 if recipe.cfg == 1.0 else 2] * recipe.steps  # ComfyUI's own cfg-1 rule agrees


@requires_comfyui
@pytest.mark.comfyui
def test_turbo_one_step_grid_is_comfyuis_sd_turbo_scheduler():
    """SDXL-Turbo's ComfyUI example samples with SDTurboScheduler; at one step its grid, [sigma(t=999), 0], is the
    KSampler's sgm_uniform grid, so the recipe runs on the plain sampler nodes."""
    import types

    from sdxl_core.sampling.schedules import SCHEDULERS, DiscreteSchedule
    from tests._comfyui_ksampler import comfyui_model_sampling
    from tests._comfyui_reference import lift

    reference = comfyui_model_sampling("eps", False)
    turbo = lift("comfy_extras/nodes_custom_sampler.py", "SDTurboScheduler")["SDTurboScheduler"]()
    (grid,) = turbo.get_sigmas(types.SimpleNamespace(get_model_object=lambda name: reference), 1, 1.0)
    assert torch.equal(grid, SCHEDULERS["sgm_uniform"](DiscreteSchedule(), 1))
