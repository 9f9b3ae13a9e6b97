"""The eps- and v-prediction networks as k-diffusion denoisers: `denoiser(x, sigma, **cond) -> x0`.

Samplers see only this interface (Karras et al. 2022, "Elucidating the Design Space", Table 1, VP column; sgm
`EpsScaling` / `VScaling` + `DiscreteDenoiser`; ComfyUI `model_sampling.EPS` / `V_PREDICTION` with
`BaseModel._apply_model`). Both take the same input, x / sqrt(sigma^2 + 1) at the nearest training timestep; they
differ in how the output becomes x0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedules import DiscreteSchedule

# network(x_in, t, **cond) -> the network's raw output (eps for an eps-prediction model)
NetworkFn = Callable[..., torch.Tensor]


class EpsDenoiser:
    """Wraps `model(x_in, t, **cond) -> eps` as `denoiser(x, sigma, **cond) -> x0` with c_in = 1/sqrt(sigma^2+1),
    t = nearest training timestep in log sigma, x0 = x - sigma * eps (ComfyUI `EPS`)."""

    def __init__(self, model: NetworkFn, schedule: DiscreteSchedule, dtype: torch.dtype | None = None):
        self.model = model
        self.schedule = schedule
        # The network's compute dtype: the scaled input and floating conditioning are cast to it and eps comes back
        # in float32, as ComfyUI's `_apply_model` does; None leaves every dtype alone.
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        sigma = per_item_sigma(sigma, x)
        sigma_b = broadcastable_sigma(sigma, x.ndim)
        x_in = x / (sigma_b**2 + 1.0) ** 0.5
        t = self.schedule.timestep(sigma).float()  # integer-valued float timesteps, one per batch item
        if self.dtype is not None:
            x_in = x_in.to(self.dtype)
            # Non-tensor inputs (a ControlNet's `control` callable) pass through untouched.
            cond = {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for k, v in cond.items()}
        output = self.model(x_in, t, **cond)
        if output.shape != x.shape:
            raise ValueError(f"the model returned {self.output_name} of shape {tuple(output.shape)} for an input of "
                             f"shape {tuple(x.shape)}")
        return self.x0(x, output.float() if self.dtype is not None else output, sigma_b)

    output_name = "eps"

    def x0(self, x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x - eps * sigma


class VDenoiser(EpsDenoiser):
    """A v-prediction network (v = alpha eps - sigma_vp x0, Salimans & Ho 2022) as a denoiser, sigma_data = 1:
    x0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1) (ComfyUI `V_PREDICTION.calculate_denoised`)."""

    output_name = "v"

    def x0(self, x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x / (sigma**2 + 1.0) - v * sigma / (sigma**2 + 1.0) ** 0.5


def per_item_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as one floating value per batch item of x, on x's device: the shape k-diffusion samplers pass
    (`sigma * s_in`); a scalar or a single value is expanded."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if not torch.is_floating_point(sigma):
        sigma = sigma.float()
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"sigma must be a scalar or one value per batch item ({x.shape[0]}), got shape "
                         f"{tuple(sigma.shape)}")
    return sigma.reshape(-1).expand(x.shape[0])


def broadcastable_sigma(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """A scalar stays a scalar; a per-item sigma gets trailing unit dims (ComfyUI `reshape_sigma`)."""
    if sigma.numel() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))
