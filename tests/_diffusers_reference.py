"""diffusers twins of our SDXL stages: the same weights in StableDiffusionXL(Img2Img)Pipeline form, for parity tests.

The per-component conversions are tests._diffusers_twins, which the component tests already check (UNet:
tests/models/test_unet.py, VAE: tests/models/test_vae.py, text encoders: our TextEncoder wraps the transformers model
diffusers runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxl_core.models.bundle import SDXLModel
from sdxl_core.text.tokenizer import clip_vocabulary
from tests._diffusers_twins import diffusers_unet, diffusers_vae

# The scheduler config shipped with stabilityai/stable-diffusion-xl-base-1.0 (scheduler/scheduler_config.json),
# less the keys EulerDiscreteScheduler ignores.
SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "use_karras_sigmas": False, "timestep_spacing": "leading", "steps_offset": 1,
}


def diffusers_clip_tokenizers(folder: Path):
    """transformers CLIPTokenizers over our bundled vocabulary, configured as the SDXL hub repo configures them:
    `tokenizer` pads with <|endoftext|>, `tokenizer_2` with "!"."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77, pad_token="!")
    return tokenizer, tokenizer_2


def euler_scheduler():
    """diffusers' SDXL default scheduler: Euler, "leading" spacing with offset 1."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG, interpolation_type="linear")


def dpmpp_2m_scheduler():
    """DPM-Solver++(2M) on the same spacing, no Karras sigmas, final sigma 0.

    Its order switches match our `dpmpp_2m`: a fresh scheduler's first step is first order (so is the refiner's,
    since img2img calls `set_timesteps` anew), and the last step is first order because `final_sigmas_type` is
    "zero" (`lower_order_final` would force it anyway below 15 steps); `lower_order_second` only affects order 3.
    Its "leading" spacing uses 1000 // (N + 1), not Euler's 1000 // N, hence a different grid (901, 811, ... 91)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SDXL_SCHEDULER_CONFIG, algorithm_type="dpmsolver++", solver_order=2,
                                       final_sigmas_type="zero", lower_order_final=True, euler_at_final=False)


SCHEDULERS = {"euler": euler_scheduler, "dpmpp_2m": dpmpp_2m_scheduler}


def base_pipeline(model: SDXLModel, tokenizers, scheduler, *, vae=None, unet=None):
    """StableDiffusionXLPipeline running the base `model`'s weights (no watermark: outputs are compared as latents).
    `vae` / `unet` pass already converted twins; by default they are converted here."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = tokenizers
    pipe = StableDiffusionXLPipeline(
        vae=vae if vae is not None else diffusers_vae(model.vae), text_encoder=model.clip_l.hf_model,
        text_encoder_2=model.clip_g.hf_model, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet if unet is not None else diffusers_unet(model.unet), scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def refiner_pipeline(model: SDXLModel, tokenizers, scheduler, *, vae=None, unet=None):
    """StableDiffusionXLImg2ImgPipeline running the refiner `model` (aesthetic-score conditioning, bigG only)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae if vae is not None else diffusers_vae(model.vae), text_encoder=None,
        text_encoder_2=model.clip_g.hf_model, tokenizer=None, tokenizer_2=tokenizers[1],
        unet=unet if unet is not None else diffusers_unet(model.unet), scheduler=scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class UNetCalls:
    """Records every forward call of a UNet, ours or diffusers', in one form: the scaled input `x`, the timesteps
    `t` (one float per batch item), `context`, the ADM vector `y` and the predicted `eps`.

    diffusers' UNet receives y in parts (pooled `text_embeds` and raw `time_ids`); its own `add_time_proj` rebuilds
    the vector our UNet receives, so both records compare directly.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.calls: list[dict[str, torch.Tensor]] = []
        self._diffusers = unet.__class__.__module__.startswith("diffusers")
        self._handles = [unet.register_forward_pre_hook(self._inputs, with_kwargs=True),
                         unet.register_forward_hook(self._output)]

    def _inputs(self, _module, args, kwargs) -> None:
        x, t = args[:2]
        if self._diffusers:
            context = kwargs["encoder_hidden_states"]
            added = kwargs["added_cond_kwargs"]
            time_ids = added["time_ids"]
            scalars = self.unet.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
            y = torch.cat([added["text_embeds"], scalars.to(added["text_embeds"].dtype)], dim=1)
        else:
            context, y = args[2:4]
        t = torch.as_tensor(t).reshape(-1).double().expand(x.shape[0])
        self.calls.append({"x": x.detach().clone(), "t": t.clone(), "context": context.detach().clone(),
                           "y": y.detach().clone()})

    def _output(self, _module, _args, output) -> None:
        eps = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        self.calls[-1]["eps"] = eps.detach().clone()

    def timesteps(self) -> list[float]:
        """The timestep of each call (the batch shares it)."""
        return [call["t"][0].item() for call in self.calls]

    def __enter__(self) -> UNetCalls:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def compare_calls(ours: UNetCalls, reference: UNetCalls) -> dict[str, float]:
    """The worst relative error per recorded quantity over matching calls; timesteps must be identical."""
    assert len(ours.calls) == len(reference.calls), (
        f"{len(ours.calls)} UNet calls here, {len(reference.calls)} in diffusers")
    worst = {"x": 0.0, "context": 0.0, "y": 0.0, "eps": 0.0}
    for i, (a, b) in enumerate(zip(ours.calls, reference.calls)):
        assert torch.equal(a["t"], b["t"]), (
            f"call {i}: timesteps {a['t'].tolist()} here, {b['t'].tolist()} in diffusers")
        for key in worst:
            assert a[key].shape == b[key].shape, f"call {i}: {key} {tuple(a[key].shape)} vs {tuple(b[key].shape)}"
            worst[key] = max(worst[key], relative_error(a[key], b[key]))
    return worst


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()
