"""Strict comparison of a checkpoint's tensors with the tensors an SDXL config needs (nanoGPT-style: every key and
every shape must match), with a report that names the missing, unexpected and mis-shaped keys.

The expected layout is not a table: it is the state dict of the real modules built on the meta device (free of
memory), under the single-file prefixes, so it cannot drift from the model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ..config import SDXLConfig, VAEConfig
from .detect import component_prefixes

# Keys that real checkpoints carry but that are not weights of our modules: their presence or absence is fine.
# CLIP position ids are always arange(77) here; `logit_scale` is the contrastive temperature, unused for text.
BOOKKEEPING_KEYS = {
    "clip_l": frozenset({"text_model.embeddings.position_ids"}),
    "clip_g": frozenset({"logit_scale", "text_model.embeddings.position_ids"}),
}
# Top-level non-weights that trainers and merge tools leave in SDXL files: sgm's discretised sigma tables, EMA
# counters and LDM noise-schedule buffers. The schedule is computed (schedules.py), never read from a file.
FILE_BOOKKEEPING_KEYS = frozenset({
    "denoiser.sigmas", "denoiser.log_sigmas", "model_ema.decay", "model_ema.num_updates", "betas", "alphas_cumprod",
    "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
})
COMPONENT_NAMES = {"unet": "UNet", "vae": "VAE", "clip_l": "CLIP-L text encoder",
                   "clip_g": "OpenCLIP bigG text encoder"}


def build_component(name: str, config: SDXLConfig | VAEConfig, *, device="meta", dtype=None, operations=None,
                    compute_dtype=None) -> nn.Module:
    """Build one component's module (on the meta device by default: no memory, no initialisation), with the layer
    classes of `operations` computing in `compute_dtype` (sdxl_core/operations.py; default: plain torch)."""
    layers = {"operations": operations, "compute_dtype": compute_dtype}
    if name == "vae":
        from ..models.vae import AutoencoderKL

        return AutoencoderKL(config if isinstance(config, VAEConfig) else config.vae, dtype=dtype, device=device,
                             **layers)
    if name == "unet":
        from ..models.unet import UNetModel

        return UNetModel(config.unet, dtype=dtype, device=device, **layers)
    from ..text.encoders import TextEncoder

    return TextEncoder(getattr(config, name), dtype=dtype, device=device, **layers)


def expected_shapes(modules: Mapping[str, nn.Module], prefixes: Mapping[str, str]) -> dict[str, tuple]:
    """Single-file key -> shape of every tensor the given modules need."""
    return {prefixes[name] + key: tuple(tensor.shape)
            for name, module in modules.items() for key, tensor in module.state_dict().items()}


def expected_layout(config: SDXLConfig) -> dict[str, tuple]:
    """Every weight key and shape a single-file checkpoint of `config` must hold (bookkeeping keys excluded)."""
    names = ["unet", "vae", "clip_g"] + (["clip_l"] if config.clip_l is not None else [])
    return expected_shapes({name: build_component(name, config) for name in names}, component_prefixes(config.kind))


@dataclass
class ValidationReport:
    """The outcome of comparing found tensors with expected ones."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, expected, found
    ignored: list[str] = field(default_factory=list)  # bookkeeping keys present and not loaded
    notes: list[str] = field(default_factory=list)  # harmless findings worth telling (e.g. repaired position ids)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self, limit: int = 8) -> list[str]:
        """One human-readable line per kind of problem, listing up to `limit` keys each."""
        lines = []

        def listed(keys: list[str]) -> str:
            more = len(keys) - limit
            return ", ".join(keys[:limit]) + (f", ... ({more} more)" if more > 0 else "")

        if self.missing:
            lines.append(f"{len(self.missing)} missing: {listed(self.missing)}")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected: {listed(self.unexpected)}")
        if self.mismatched:
            shown = [f"{key} (expected {list(want)}, found {list(got)})" for key, want, got in self.mismatched]
            lines.append(f"{len(self.mismatched)} mis-shaped: {listed(shown)}")
        return lines


def validate(found: Mapping[str, tuple], expected: Mapping[str, tuple], prefixes: Mapping[str, str],
             skip_prefixes: tuple[str, ...] = ()) -> ValidationReport:
    """Compare found key shapes with the expected ones; keys under `skip_prefixes` are neither needed nor judged."""
    report = ValidationReport()
    bookkeeping = {prefixes[name] + key for name, keys in BOOKKEEPING_KEYS.items() if name in prefixes
                   for key in keys} | FILE_BOOKKEEPING_KEYS
    for key in sorted(expected):
        if key.startswith(skip_prefixes):
            continue
        if key not in found:
            report.missing.append(key)
        elif tuple(found[key]) != tuple(expected[key]):
            report.mismatched.append((key, tuple(expected[key]), tuple(found[key])))
    for key in sorted(found):
        if key in expected or key.startswith(skip_prefixes):
            continue
        (report.ignored if key in bookkeeping else report.unexpected).append(key)
    return report
