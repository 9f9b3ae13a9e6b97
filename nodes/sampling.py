"""Sampler nodes: the base (steps 0..K, handing its noisy latent on) and the latent refiner (steps K..N, or an
img2img strength), with ComfyUI KSamplerAdvanced semantics so the numbers mean what they mean in core workflows."""

from __future__ import annotations

import torch

from sdxl_core.sampling.samplers import SAMPLERS
from sdxl_core.sampling.schedules import SCHEDULERS
from sdxl_core.sampling.settings import MAX_SEED, MAX_STEPS, TWO_STAGE_HANDOFF, TWO_STAGE_STEPS, SamplingSettings

from . import comfy_host, graph_checks
from ._shared import CATEGORY, MODEL_INPUT, check_widgets, network_stage, node_id, require_stage, validate_widgets

SAMPLER_NAMES = list(SAMPLERS)
SCHEDULER_NAMES = list(SCHEDULERS)
# The widgets' defaults are the core's: SamplingSettings (ComfyUI KSampler's cfg, sampler and scheduler) and the
# SDXL two-stage recipe's 25 steps with the refiner from step 20.
DEFAULTS = SamplingSettings(steps=TWO_STAGE_STEPS)
# LATENT key under which the base sampler records where it handed off, so the refiner can check it continues there.
# Core nodes copy unknown LATENT keys along (or drop them); only a latent that still carries noise has it.
HANDOFF_KEY = "sdxl_two_stage_handoff"

_COMMON_TOOLTIPS = {
    "positive": "What the image should show: CONDITIONING from this stage's own text-encode node.",
    "negative": "What to steer away from: CONDITIONING from this stage's own text-encode node (may be an empty "
                "prompt).",
    "seed": "Seed of the starting noise and of the noise the ancestral and SDE samplers add on the way. ComfyUI "
            "draws both the same way, so a seed gives the same noise as in a core KSampler workflow.",
    "steps": "N, the total steps of the whole base + refiner schedule. Use the same N in both samplers.",
    "cfg": "Classifier-free guidance: how strongly to follow the prompt over the negative. SDXL works best around "
           "5-8; higher burns colours.",
    "sampler_name": "The solver (ComfyUI's names). Use the same one in both samplers for a clean handoff.",
    "scheduler": "How the noise levels are spaced over the N steps (ComfyUI's names). Use the same in both "
                 "samplers: the handoff step K means 'step K of this schedule'.",
}


_COMFY_MODEL_TOOLTIP = (" ComfyUI's own MODEL of an SDXL checkpoint (Load Checkpoint, with LoRAs from any LoRA "
                        "loader) works too; patches that change how the UNet computes (attention replacements, "
                        "custom CFG functions) are refused.")


def _sampling_inputs(model_tooltip: str) -> dict:
    return {
        "model": (MODEL_INPUT, {"tooltip": model_tooltip + _COMFY_MODEL_TOOLTIP}),
        "positive": ("CONDITIONING", {"tooltip": _COMMON_TOOLTIPS["positive"]}),
        "negative": ("CONDITIONING", {"tooltip": _COMMON_TOOLTIPS["negative"]}),
        "latent_image": ("LATENT", {"tooltip": "The latent to denoise."}),
        "seed": ("INT", {"default": DEFAULTS.seed, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                         "tooltip": _COMMON_TOOLTIPS["seed"]}),
        "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": MAX_STEPS, "tooltip": _COMMON_TOOLTIPS["steps"]}),
        "cfg": ("FLOAT", {"default": DEFAULTS.cfg, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": _COMMON_TOOLTIPS["cfg"]}),
        "sampler_name": (SAMPLER_NAMES, {"default": DEFAULTS.sampler, "tooltip": _COMMON_TOOLTIPS["sampler_name"]}),
        "scheduler": (SCHEDULER_NAMES, {"default": DEFAULTS.scheduler, "tooltip": _COMMON_TOOLTIPS["scheduler"]}),
    }


def _check_base(steps=None, end_at_step=None, denoise=None, leftover_noise=None, cfg=None) -> None:
    check_widgets(BaseSampler, steps=steps, end_at_step=end_at_step, denoise=denoise, cfg=cfg)
    if steps is not None and end_at_step is not None and end_at_step > steps:
        raise ValueError(f"end_at_step (K = {end_at_step}) is past the last step (N = {steps}): the base can stop at "
                         f"most at step {steps}; set K between 1 and N (K = N runs the base alone)")
    handoff = (steps is not None and end_at_step is not None and end_at_step < steps and leftover_noise is not False)
    if handoff and denoise is not None and denoise < 1.0:
        # With denoise < 1, step K lies on a shortened img2img grid, at a lower noise level than step K of the full
        # N-step grid the refiner continues: it would treat the latent as noisier than it is.
        raise ValueError(f"denoise {denoise} cannot hand off to the refiner: the SDXL Latent Refiner continues step "
                         f"K of the full {steps}-step schedule, but with denoise below 1 the base's step K is at a "
                         f"lower noise level. Keep denoise 1.0 for the two-stage handoff; for image-to-image, "
                         f"finish with the base (end_at_step = steps, or leftover noise off) and polish the image "
                         f"with the refiner at start_at_step 0 and its own denoise strength")


def _check_refiner(steps=None, start_at_step=None, denoise=None, cfg=None) -> None:
    check_widgets(RefinerSampler, steps=steps, start_at_step=start_at_step, denoise=denoise, cfg=cfg)
    if steps is not None and start_at_step is not None and start_at_step > steps:
        raise ValueError(f"start_at_step (K = {start_at_step}) is past the last step (N = {steps}); set K to the "
                         f"base sampler's end_at_step, between 0 and N")
    if start_at_step and denoise is not None and denoise < 1.0:
        raise ValueError(f"use either start_at_step (continue the base's noisy latent from step K) or denoise < 1 "
                         f"(refine a finished image), not both: got start_at_step {start_at_step} and denoise "
                         f"{denoise}")


def _check_handoff(latent: dict, steps: int, start_at_step: int, scheduler: str) -> None:
    """Refuse, in a sentence, to continue a base handoff from another step, step count or scheduler, or to re-noise
    it from scratch; a latent without the mark (core samplers, files) is taken as it is."""
    mark = latent.get(HANDOFF_KEY) if isinstance(latent, dict) else None
    if not isinstance(mark, dict):
        return
    base_steps, base_end, base_scheduler = mark.get("steps"), mark.get("end_at_step"), mark.get("scheduler")
    where = f"the base sampler handed off at step {base_end} of {base_steps} (scheduler {base_scheduler})"
    if start_at_step == 0:
        raise ValueError(f"this latent still holds the base's noise: {where}. Set start_at_step = {base_end} to "
                         f"continue it; to refine a finished image instead, set the base's end_at_step = steps or "
                         f"turn its leftover noise off")
    if (steps, start_at_step, scheduler) != (base_steps, base_end, base_scheduler):
        raise ValueError(f"{where}, but this refiner is set to start at step {start_at_step} of {steps} (scheduler "
                         f"{scheduler}): the noise levels would not match. Set steps = {base_steps}, start_at_step "
                         f"= {base_end} and scheduler {base_scheduler}, as in the base sampler")


def _activation_bytes(model, latent: dict, branches: int = 2) -> int:
    """Device memory to ask ComfyUI for next to the UNet's weights while sampling this latent (0 if unreadable).

    `branches` is the number of conditioning entries evaluated per latent item in one step: 2 for a plain
    positive/negative pair, one more for each extra entry a ConditioningCombine adds (all run in one batch).
    """
    from sdxl_core.runtime.residency import unet_activation_bytes

    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        return 0  # the sampler refuses it with a sentence
    batch, _, height, width = samples.shape
    return unet_activation_bytes(model.unet, branches * batch, height, width)


def _stage(model, latent: dict, positive: list, negative: list, node: str, controls: list):
    """(our SDXLModel, the ComfyUI MODEL it was borrowed from or None).

    A ComfyUI MODEL is loaded by ComfyUI now (with the controls' networks and room for this latent's activations)
    and our UNet is built around its loaded weights for this run. ComfyUI's own ControlNet objects need ComfyUI's
    model of the UNet they steer: the MODEL itself, or for our model the one sharing its weights."""
    if not comfy_host.is_comfy_model(model):
        return model, None  # ComfyUI's model of our UNet, for the controls, is made in _run's stage
    samples = latent.get("samples") if isinstance(latent, dict) else None
    memory = comfy_host.control_memory(controls, model.model_dtype())
    if isinstance(samples, torch.Tensor) and samples.ndim == 4:
        branches = (len(positive) if isinstance(positive, list) else 1) + \
            (len(negative) if isinstance(negative, list) else 1)
        memory += comfy_host.model_memory_required(model, samples.shape, branches)
    extra = [*comfy_host.control_patchers(controls),
             *comfy_host.network_patchers(_pack_controlnets(positive, negative), role="unet")]
    stage = comfy_host.core_stage_from_comfy_model(model, node, memory, extra)
    return stage, model


def _pack_controlnets(positive, negative) -> list:
    """The networks 'SDXL Apply ControlNet' put on well-formed conditioning (malformed ones are refused later, with
    a sentence, by the conditioning check)."""
    from sdxl_core.sampling.control import controlnets_in

    def well_formed(conditioning) -> bool:
        return isinstance(conditioning, list) and all(
            isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)
            for entry in conditioning)

    return controlnets_in(positive, negative) if well_formed(positive) and well_formed(negative) else []


def _run(model, latent: dict, positive: list, negative: list, total_steps: int, settings: SamplingSettings,
         controls: list = (), comfy_model=None, node: str = "SDXL Base Sampler", **step_range) -> tuple[dict]:
    """Validate the conditioning, put the UNet on the device, sample with per-step progress and interruption.
    `comfy_model`: the ComfyUI MODEL `model` was borrowed from (see _stage), or None for our own model."""
    borrowed = comfy_model is not None
    from sdxl_core.sampling.control import controlnets_in
    from sdxl_core.sampling.ksampler import sample_latent, validate_conditioning_for
    from sdxl_core.sampling.samplers import SamplingCancelled

    validate_conditioning_for(model, positive, "positive")
    validate_conditioning_for(model, negative, "negative")
    progress = comfy_host.StepProgress(total_steps)

    def on_step(info: dict) -> None:
        progress.update(info["i"] + 1, info["denoised"])

    with network_stage(model, "unet"):  # our UNet is read for these steps and released after them
        if controls and comfy_model is None:
            # ComfyUI's ControlNet objects steer ComfyUI's model of the UNet: one sharing our UNet's tensors, made
            # inside the stage so it goes with the UNet when the stage releases it.
            comfy_model = comfy_host.comfy_model_from_core(model, node)
        # The ControlNets that 'SDXL Apply ControlNet' put on the conditioning run next to the UNet at every step;
        # a borrowed ComfyUI MODEL was loaded with them (_stage), in one call, so neither evicts the other.
        if not borrowed:
            memory = _activation_bytes(model, latent, len(positive) + len(negative))
            if controls:
                memory += comfy_host.control_memory(controls, comfy_model.model_dtype())
            comfy_host.prepare_networks([model.unet, *controlnets_in(positive, negative)], role="unet",
                                        memory_required=memory, extra_patchers=comfy_host.control_patchers(controls))
        if controls:
            comfy_host.pre_run_controls(controls, comfy_model)
        try:
            out = sample_latent(model, latent, positive, negative, settings, callback=on_step,
                                cancel=comfy_host.interrupted, **step_range)
        except SamplingCancelled:
            comfy_host.raise_if_interrupted()  # ComfyUI's own exception, so the run ends as "interrupted"
            raise
        finally:
            if controls:
                comfy_host.cleanup_controls(controls)
    result = {key: value for key, value in out.items() if key != HANDOFF_KEY}
    return ({**result, "samples": out["samples"].to(comfy_host.output_device())},)


class BaseSampler:
    """Run the SDXL base over steps 0..K of an N-step schedule and hand its latent on with the noise left in."""

    SEARCH_ALIASES = ('ksampler', 'ksampler advanced', 'sampler', 'base sampler')
    DESCRIPTION = ("Denoises with the SDXL base. In the two-stage setup it runs the first K of N steps "
                   "(end_at_step) and passes a still-noisy latent to the SDXL Latent Refiner, which runs steps K..N "
                   "with the same seed, N, sampler and scheduler. With end_at_step = steps it finishes the image "
                   "alone.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent after step K (still noisy when handing off), in ComfyUI's LATENT format.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _sampling_inputs("The SDXL base from 'Load SDXL Checkpoint' (the refiner goes into the SDXL Latent "
                                  "Refiner node).")
        inputs["end_at_step"] = ("INT", {
            "default": TWO_STAGE_HANDOFF, "min": 1, "max": MAX_STEPS,
            "tooltip": "K: the step at which the base stops and the refiner takes over (1..steps). About 80% of "
                       "steps is usual (20 of 25); K = steps runs the base alone."})
        inputs["leftover_noise"] = ("BOOLEAN", {
            "default": True, "label_on": "hand off (keep noise)", "label_off": "finish at K",
            "tooltip": "When stopping before the last step: keep the remaining noise in the latent for the refiner "
                       "(on, the two-stage setup), or squeeze the rest of the denoising into step K and return a "
                       "finished latent (off)."})
        inputs["denoise"] = ("FLOAT", {
            "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
            "tooltip": "1.0 for text-to-image. Below 1, image-to-image: how much of the input latent to repaint "
                       "(0.3 keeps the composition, 0.8 keeps little). Below 1 the base cannot hand off to the "
                       "refiner: set end_at_step = steps."})
        # The queued graph, to check the refiners this base feeds before sampling (nodes/graph_checks.py).
        return {"required": inputs, "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None):
        # ComfyUI's own range check lets NaN through (it compares with < and >): a non-finite cfg stops at queue time,
        # one input per check so the sentence appears once; a non-finite denoise is refused before sampling.
        return validate_widgets(cls, cfg=cfg)

    # The checks that combine inputs run here, once, before any sampling (ComfyUI repeats a VALIDATE_INPUTS
    # sentence once per input in its signature); ComfyUI's own range checks stay on each input.
    def sample(self, model, positive, negative, latent_image, seed: int, steps: int, cfg: float, sampler_name: str,
               scheduler: str, end_at_step: int, leftover_noise: bool = True, denoise: float = 1.0, prompt=None,
               unique_id=None):
        _check_base(steps, end_at_step, denoise, bool(leftover_noise), cfg)
        check_widgets(BaseSampler, sampler_name=sampler_name, scheduler=scheduler)
        end = end_at_step if end_at_step < steps else None
        leftover = bool(leftover_noise) and end is not None
        # Before _stage: the graph's mistakes need no model, and a borrowed ComfyUI MODEL is loaded there.
        graph_checks.check_base_graph(prompt, None if unique_id is None else str(unique_id), steps, end, scheduler,
                                      leftover, _check_refiner)
        positive, negative, controls = comfy_host.adapt_comfy_controls(positive, negative)
        model, comfy_model = _stage(model, latent_image, positive, negative, "SDXL Base Sampler", controls)
        require_stage(model, "base", "SDXL Base Sampler")
        settings = SamplingSettings(seed=seed, steps=steps, cfg=cfg, sampler=sampler_name, scheduler=scheduler,
                                    denoise=denoise)
        (latent,) = _run(model, latent_image, positive, negative, end or steps, settings, controls, comfy_model,
                         end_step=end, return_with_leftover_noise=leftover)
        if leftover:
            latent[HANDOFF_KEY] = {"steps": steps, "end_at_step": end, "scheduler": scheduler}
        return (latent,)


class RefinerSampler:
    """Run the SDXL refiner over steps K..N of the base's schedule, or refine a finished image by a strength."""

    SEARCH_ALIASES = ('ksampler advanced', 'refiner', 'img2img', 'refine')
    DESCRIPTION = ("Denoises with the SDXL refiner, which was trained only on the last, low-noise part of the "
                   "schedule. Two-stage: wire in the base sampler's latent and set start_at_step to the base's "
                   "end_at_step K (no new noise is added). Refining a finished image: start_at_step 0 and a denoise "
                   "strength around 0.2-0.3 (noise is added for that strength).")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The fully denoised latent, ready for SDXL VAE Decode (or ComfyUI's VAE Decode).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _sampling_inputs("The SDXL refiner from 'Load SDXL Checkpoint'. The base does not belong here: it "
                                  "goes into the SDXL Base Sampler.")
        inputs["start_at_step"] = ("INT", {
            "default": TWO_STAGE_HANDOFF, "min": 0, "max": MAX_STEPS,
            "tooltip": "K: the step to continue from, equal to the base sampler's end_at_step. 0 means refine a "
                       "finished latent by the denoise strength instead."})
        inputs["denoise"] = ("FLOAT", {
            "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
            "tooltip": "Only with start_at_step 0: how strongly to re-noise and refine a finished image (0.2-0.3 "
                       "polishes detail; higher starts to change content). Keep 1.0 for the two-stage handoff."})
        return {"required": inputs}

    # Its settings checks run in sample() (see BaseSampler), and a base sampler feeding it runs them before it
    # samples; only non-finite values, which ComfyUI's range check lets through, stop at queue time.
    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None):
        return validate_widgets(cls, cfg=cfg)

    def sample(self, model, positive, negative, latent_image, seed: int, steps: int, cfg: float, sampler_name: str,
               scheduler: str, start_at_step: int, denoise: float = 1.0):
        _check_refiner(steps, start_at_step, denoise, cfg)
        check_widgets(RefinerSampler, sampler_name=sampler_name, scheduler=scheduler)
        positive, negative, controls = comfy_host.adapt_comfy_controls(positive, negative)
        model, comfy_model = _stage(model, latent_image, positive, negative, "SDXL Latent Refiner", controls)
        require_stage(model, "refiner", "SDXL Latent Refiner")
        _check_handoff(latent_image, steps, start_at_step, scheduler)
        # A handoff continues the base's own noise; a strength-based refine starts from clean pixels and needs fresh
        # noise (KSamplerAdvanced add_noise disable / enable).
        handoff = start_at_step > 0
        settings = SamplingSettings(seed=seed, steps=steps, cfg=cfg, sampler=sampler_name, scheduler=scheduler,
                                    denoise=denoise)
        return _run(model, latent_image, positive, negative, max(steps - start_at_step, 1), settings, controls,
                    comfy_model, node="SDXL Latent Refiner", start_step=start_at_step, add_noise=not handoff)


NODE_CLASS_MAPPINGS = {
    node_id("BaseSampler"): BaseSampler,
    node_id("RefinerSampler"): RefinerSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("BaseSampler"): "SDXL Base Sampler (steps 0..K)",
    node_id("RefinerSampler"): "SDXL Latent Refiner (steps K..N)",
}
