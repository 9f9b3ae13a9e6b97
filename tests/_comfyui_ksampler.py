"""ComfyUI's KSampler path around one of our tiny UNets, as the reference for whole sampling recipes: ComfyUI's
`ModelSamplingDiscrete` node (the prediction type and zsnr), its `RescaleCFG` node's cfg function, its scheduler
functions, its `sampling_function` cfg-1 rule and `cfg_function`, its noise scaling and its sampler, all ComfyUI's
own code loaded from COMFYUI_PATH (tests/_comfyui_reference.py). Only the UNet and the conditioning's UNet inputs
(context, y) are ours, so an equal latent says the recipe's numbers mean what they mean in ComfyUI.
"""

from __future__ import annotations

import math
import types

import torch

from tests._comfyui_reference import KDiffusionModelStub, lift, load_modules, rescale_cfg_function

# The samplers ComfyUI's KSampler runs on a grid of steps + 1 sigmas with the penultimate one dropped; a recipe on
# one of them would need that rule here too.
_DISCARD_PENULTIMATE = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


def comfyui_model_sampling(prediction: str, zsnr: bool):
    """What ComfyUI's ModelSamplingDiscrete node patches onto an SDXL MODEL for (sampling, zsnr)."""
    module = load_modules().model_sampling
    node = lift("comfy_extras/nodes_model_advanced.py", "ModelSamplingDiscrete",
                namespace={"comfy": types.SimpleNamespace(model_sampling=module)})["ModelSamplingDiscrete"]()
    patched = {}

    class _Patcher:
        model = types.SimpleNamespace(model_config=types.SimpleNamespace(sampling_settings={}))

        def clone(self):
            return self

        def add_object_patch(self, name, value):
            patched[name] = value

    node.patch(_Patcher(), prediction, zsnr)
    return patched["model_sampling"]


def comfyui_sigmas(model_sampling, scheduler: str, steps: int) -> torch.Tensor:
    """ComfyUI's `calculate_sigmas` for a scheduler name (the functions of comfy/samplers.py and k-diffusion)."""
    import scipy.stats

    k_sampling = load_modules().sampling
    functions = lift("comfy/samplers.py", "simple_scheduler", "ddim_scheduler", "normal_scheduler", "beta_scheduler",
                     "linear_quadratic_schedule", "kl_optimal_scheduler", namespace={"scipy": scipy})
    low, high = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    schedulers = {
        "simple": lambda n: functions["simple_scheduler"](model_sampling, n),
        "ddim_uniform": lambda n: functions["ddim_scheduler"](model_sampling, n),
        "normal": lambda n: functions["normal_scheduler"](model_sampling, n),
        "sgm_uniform": lambda n: functions["normal_scheduler"](model_sampling, n, sgm=True),
        "beta": lambda n: functions["beta_scheduler"](model_sampling, n),
        "karras": lambda n: k_sampling.get_sigmas_karras(n, low, high),
        "exponential": lambda n: k_sampling.get_sigmas_exponential(n, low, high),
        "linear_quadratic": lambda n: functions["linear_quadratic_schedule"](model_sampling, n),
        "kl_optimal": lambda n: functions["kl_optimal_scheduler"](n, low, high),
    }
    return schedulers[scheduler](steps)


class ComfyUIGuidedUNet(KDiffusionModelStub):
    """Our UNet under ComfyUI's model sampling and guidance: [cond; uncond] in one batch (the unconditional branch
    skipped at cfg 1, as `sampling_function` skips it), x0 from ComfyUI's `calculate_denoised`, combined by
    ComfyUI's `cfg_function` with RescaleCFG's function when a multiplier is given. Counts UNet calls and rows."""

    def __init__(self, unet, cond: dict, uncond: dict, cfg: float, model_sampling, rescale: float | None = None):
        super().__init__(None, model_sampling)
        self.unet, self.cond, self.uncond, self.cfg, self.sampling = unet, cond, uncond, cfg, model_sampling
        self.options = {} if rescale is None else {"sampler_cfg_function": rescale_cfg_function(rescale)}
        self.cfg_function = lift("comfy/samplers.py", "cfg_function")["cfg_function"]
        self.rows: list[int] = []

    def __call__(self, x, sigma, model_options=None, **kwargs):
        options = {**self.options, **(model_options or {})}
        batch = x.shape[0]
        skip_uncond = math.isclose(self.cfg, 1.0) and not options.get("disable_cfg1_optimization", False)
        sides = [self.cond] if skip_uncond else [self.cond, self.uncond]
        inputs = {key: torch.cat([side[key].expand(batch, *side[key].shape[1:]) for side in sides])
                  for key in self.cond}
        x_all, sigma_all = torch.cat([x] * len(sides)), torch.cat([sigma] * len(sides))
        x_in = self.sampling.calculate_input(sigma_all, x_all)
        out = self.unet(x_in, self.sampling.timestep(sigma_all).float(), inputs["context"], inputs["y"])
        self.rows.append(x_all.shape[0])
        predictions = self.sampling.calculate_denoised(sigma_all, out, x_all).split(batch)
        cond_x0 = predictions[0]
        uncond_x0 = torch.zeros_like(cond_x0) if skip_uncond else predictions[1]
        return self.cfg_function(None, cond_x0, uncond_x0, self.cfg, x, sigma, model_options=options)


def comfyui_ksampler(model, positive: list, negative: list, noise: torch.Tensor, *, sampler: str, scheduler: str,
                     steps: int, cfg: float, seed: int, prediction: str, zsnr: bool, rescale: float | None = None,
                     sigmas: torch.Tensor | None = None) -> tuple[torch.Tensor, ComfyUIGuidedUNet]:
    """ComfyUI's KSampler (text to image from an empty latent, denoise 1) on `model`'s UNet: the unscaled latent
    it returns, and the guided model (its `.rows` per UNet call). `sigmas` replaces the scheduler's grid (a
    SamplerCustom with a sigmas node)."""
    from sdxl_core.sampling.ksampler import guided_denoiser
    from tests.sampling.test_samplers import comfyui_sample

    if sampler in _DISCARD_PENULTIMATE:
        raise NotImplementedError(f"{sampler} runs on a grid with its penultimate sigma dropped; not modelled here")
    reference = comfyui_model_sampling(prediction, zsnr)
    guided = guided_denoiser(model, positive, negative, cfg, tuple(noise.shape[-2:]))
    guided_unet = ComfyUIGuidedUNet(model.unet, guided.cond[0].cond, guided.uncond[0].cond, cfg, reference, rescale)
    if sigmas is None:
        sigmas = comfyui_sigmas(reference, scheduler, steps)
    max_denoise = math.isclose(float(reference.sigma_max), float(sigmas[0]), rel_tol=1e-05) or \
        float(sigmas[0]) > float(reference.sigma_max)
    x = reference.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise)
    with torch.inference_mode():
        samples = comfyui_sample(sampler, guided_unet, x, sigmas, seed)
    samples = reference.inverse_noise_scaling(sigmas[-1], samples)
    return samples / model.config.vae.scale_factor, guided_unet
