"""`python -m sdxl_core inspect PATH`: what a checkpoint is and whether it loads, from the header alone.

Reads only the safetensors header(s) (an 8-byte length and a JSON table), so a 7 GB file is described in
milliseconds; `--check-weights` additionally streams every tensor once to look for NaN/Inf.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoints.detect import VAE_PREFIX, component_prefixes
from ..checkpoints.errors import CheckpointError
from ..checkpoints.files import LazyTensor, dtype_code, file_size_of
from ..checkpoints.loading import inspect_checkpoint, inspect_vae, refuse_unless_sdxl
from ..checkpoints.source import CheckpointSource, open_source
from ..checkpoints.validation import BOOKKEEPING_KEYS, COMPONENT_NAMES
from ..config import SDXLConfig, VAEConfig


@dataclass
class ComponentSummary:
    """One network inside a checkpoint: its tensors, parameters and stored dtypes."""

    name: str  # "unet", "vae", "clip_l", "clip_g"
    title: str
    tensors: int
    parameters: int
    dtypes: dict[str, int]  # safetensors dtype code -> tensor count


@dataclass
class CheckpointReport:
    """What `describe` found: enough for a person to decide what to do with the file."""

    path: str
    format: str | None = None  # "safetensors file" / "diffusers folder"
    layout: str | None = None  # "original" / "diffusers"
    size_bytes: int | None = None
    kind: str = "unreadable"  # "sdxl-base", "sdxl-refiner", "sdxl-vae", "sd1", ..., "unreadable"
    description: str = ""
    loadable: bool = False  # as a checkpoint (base/refiner) or, for a VAE file, as a separate VAE
    components: list[ComponentSummary] = field(default_factory=list)
    config: SDXLConfig | VAEConfig | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(c.parameters for c in self.components)

    def to_json(self) -> dict:
        data = asdict(self)
        data["config"] = repr(self.config) if self.config is not None else None
        data["parameters"] = self.parameters
        if isinstance(self.config, SDXLConfig):
            data["prediction"] = self.config.prediction
            data["zsnr"] = self.config.noise_schedule.zsnr
        return data


def summarise_components(tensors: Mapping[str, LazyTensor] | Mapping[str, tuple], kind: str,
                         dtypes: Mapping[str, torch.dtype] | None = None) -> list[ComponentSummary]:
    """Per-component tensor and parameter counts (bookkeeping keys excluded) of an SDXL base/refiner/VAE file."""
    prefixes = {"vae": VAE_PREFIX} if kind == "sdxl-vae" else component_prefixes(kind.removeprefix("sdxl-"))
    summaries = []
    for name, prefix in prefixes.items():
        skip = {prefix + key for key in BOOKKEEPING_KEYS.get(name, ())}
        keys = [key for key in tensors if key.startswith(prefix) and key not in skip]
        if not keys:
            continue
        shapes = [tensors[k].shape if isinstance(tensors[k], LazyTensor) else tensors[k] for k in keys]
        codes = Counter(dtype_code(tensors[k].dtype) if isinstance(tensors[k], LazyTensor) else
                        dtype_code(dtypes[k]) if dtypes else "?" for k in keys)
        count = sum(int(torch.Size(shape).numel()) for shape in shapes)
        summaries.append(ComponentSummary(name, COMPONENT_NAMES[name], len(keys), count, dict(codes)))
    return summaries


def _scan_weights(source: CheckpointSource) -> list[str]:
    """Read every floating tensor once (one at a time) and name those holding NaN/Inf."""
    bad = []
    for key, lazy in source.tensors.items():
        if not lazy.dtype.is_floating_point:
            continue
        tensor = lazy.read()
        count = int((~torch.isfinite(tensor)).sum())
        if count:
            bad.append(f"{key} holds {count} NaN/Inf values (of {tensor.numel()})")
        del tensor
    return bad


def describe(path: Path | str, *, expect: str | None = None, check_weights: bool = False) -> CheckpointReport:
    """Describe a checkpoint, VAE file or diffusers folder without loading it (never raises a CheckpointError)."""
    path = Path(path)
    report = CheckpointReport(path=str(path))
    try:
        source = open_source(path)
    except CheckpointError as error:
        report.problems.append(str(error))
        return report
    report.format, report.layout, report.metadata = source.format, source.layout, dict(source.hints)
    report.size_bytes = sum(file_size_of(p) for p in source.files) if source.files else file_size_of(path)
    report.kind, report.description = source.identification.kind, source.identification.description
    try:
        if report.kind == "sdxl-vae":
            _, report.config, validation = inspect_vae(source)
        else:
            refuse_unless_sdxl(source, expect)
            _, report.config, validation = inspect_checkpoint(source, expect=expect)
    except CheckpointError as error:
        report.problems.append(str(error))
        validation = None
    if report.kind.startswith("sdxl-"):
        report.components = summarise_components(source.tensors, report.kind)
    if validation is not None:
        report.problems.extend(validation.problems())
        if validation.ignored:
            report.notes.append(f"bookkeeping keys not loaded: {', '.join(validation.ignored)}")
    if check_weights and not report.problems:
        report.problems.extend(_scan_weights(source))
    report.loadable = not report.problems
    return report


def _format_config(config: SDXLConfig | VAEConfig) -> list[str]:
    if isinstance(config, VAEConfig):
        return [f"VAE {config.base_channels} ch x {config.channel_mult}, {config.num_res_blocks} res blocks, "
                f"{config.latent_channels} latent channels"]
    unet = config.unet
    lines = [f"UNet {unet.model_channels} ch x {unet.channel_mult}, transformer depths {unet.transformer_depth} "
             f"(middle {unet.transformer_depth_middle}), context {unet.context_dim}, ADM {unet.adm_in_channels}, "
             f"{unet.num_head_channels}-wide heads"]
    for name, clip in (("CLIP-L", config.clip_l), ("bigG", config.clip_g)):
        if clip is not None:
            lines.append(f"{name} width {clip.hidden_size}, {clip.num_layers} layers, {clip.num_heads} heads"
                         + (f", projection {clip.projection_dim}" if clip.projection_dim else ""))
    lines.append(f"VAE {config.vae.base_channels} ch x {config.vae.channel_mult}, "
                 f"{config.vae.latent_channels} latent channels")
    return lines


def _format_prediction(config: SDXLConfig) -> str:
    """The prediction type and schedule as read from the markers, and how to override them."""
    markers = ("the v_pred and ztsnr markers" if config.noise_schedule.zsnr else "the v_pred marker"
               if config.prediction == "v_prediction" else "no v_pred marker")
    zsnr = "zero terminal SNR" if config.noise_schedule.zsnr else "no zero terminal SNR"
    return (f"{config.prediction}, {zsnr} (from {markers}; override with --prediction / --zsnr or the Model "
            "Sampling node)")


def _human_size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} bytes"


def format_report(report: CheckpointReport) -> str:
    """The human-readable text `inspect` prints."""
    lines = [report.path]
    if report.format:
        size = f", {_human_size(report.size_bytes)}" if report.size_bytes is not None else ""
        lines.append(f"  format:     {report.format}, {report.layout} layout{size}")
    if report.description:
        lines.append(f"  contents:   {report.description}")
    for component in report.components:
        dtypes = ", ".join(f"{code} x{n}" for code, n in sorted(component.dtypes.items()))
        lines.append(f"  {component.title + ':':<28}{component.parameters:>15,} parameters in "
                     f"{component.tensors} tensors ({dtypes})")
    if report.components:
        lines.append(f"  {'total:':<28}{report.parameters:>15,} parameters")
    if report.config is not None:
        lines.extend(f"  config:     {line}" for line in _format_config(report.config))
    if isinstance(report.config, SDXLConfig):
        lines.append(f"  prediction: {_format_prediction(report.config)}")
    lines.extend(f"  note:       {note}" for note in report.notes)
    lines.extend(f"  problem:    {problem}" for problem in report.problems)
    what = "as a separate VAE" if report.kind == "sdxl-vae" else "as an SDXL checkpoint"
    lines.append(f"  verdict:    {'loadable ' + what if report.loadable else 'NOT loadable'}")
    return "\n".join(lines)


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """The `inspect` subcommand's arguments."""
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="checkpoint .safetensors file(s), VAE file(s) or diffusers folder(s)")
    parser.add_argument("--expect", choices=["base", "refiner"], help="also require this SDXL variant")
    parser.add_argument("--check-weights", action="store_true",
                        help="read every tensor once to look for NaN/Inf (slow: reads the whole file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per path")


def run_inspect(args: argparse.Namespace) -> int:
    """Describe each path; exit status 0 when all of them are loadable, 1 otherwise."""
    status = 0
    for path in args.paths:
        report = describe(path, expect=args.expect, check_weights=args.check_weights)
        print(json.dumps(report.to_json()) if args.json else format_report(report), flush=True)
        status = status if report.loadable else 1
    return status
