"""The eps-prediction network as a k-diffusion denoiser: `denoiser(x, sigma, **cond) -> x0`.

Samplers see only this interface (Karras et al. 2022, "Elucidating the Design Space", Table 1, VP/eps column;
sgm `EpsScaling` + `DiscreteDenoiser`; ComfyUI `model_sampling.EPS` with `BaseModel._apply_model`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedules import DiscreteEpsSchedule

EpsModel = Callable[..., torch.Tensor]


class EpsDenoiser:
    """Wraps `model(x_in, t, **cond) -> eps` as `denoiser(x, sigma, **cond) -> x0` with c_in = 1/sqrt(sigma^2+1),
    t = nearest training timestep in log sigma, x0 = x - sigma * eps (ComfyUI `EPS`)."""

    def __init__(self, model: EpsModel, schedule: DiscreteEpsSchedule, dtype: torch.dtype | None = None):
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
        eps = self.model(x_in, t, **cond)
        if eps.shape != x.shape:
            raise ValueError(f"the model returned eps of shape {tuple(eps.shape)} for an input of shape "
                             f"{tuple(x.shape)}")
        return x - eps.float() * sigma_b if self.dtype is not None else x - eps * sigma_b


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
