"""ComfyUI's own ControlNet objects on CONDITIONING, run by this pack's samplers (part of the door to ComfyUI,
nodes/comfy_host): Apply ControlNet (Advanced) with ComfyUI's ControlNet loader.

The core runs them through its ExternalControl hook (sdxl_core/sampling/control.py): for every UNet call of the
entries carrying one, ComfyUI's `get_control(x, sigma, cond, batched_number, transformer_options)` is called with
that call's input, as ComfyUI's `calc_cond_batch` does, after `pre_run(model, percent_to_sigma)` on ComfyUI's own
diffusion model (ControlLoRAs read its weights) and before `cleanup()`, as ComfyUI's sampler does; its networks
load with the UNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .core_types import _comfy_class

_control_class = None


def _comfy_control_adapter():
    global _control_class
    if _control_class is None:
        from sdxl_core.sampling.control import ExternalControl, input_block_count, residuals_from_lists

        class ComfyControl(ExternalControl):
            """One ComfyUI control object (with the chain of those applied before it) as the core sees it."""

            def __init__(self, control):
                self.control = control
                self.blocks = None

            def prepare(self, schedule, unet_config, where):
                self.blocks = input_block_count(unet_config)
                return self

            def at(self, sigma, chunks, x=None, sigmas=None):
                def run(x_in, t, context, y):
                    out = self.control.get_control(x, sigmas, {"c_crossattn": context, "y": y}, chunks,
                                                   {"sigmas": sigmas})
                    return None if out is None else residuals_from_lists(out, self.blocks)
                return run

        _control_class = ComfyControl
    return _control_class


def _controls_to_uncond(positive: list, negative: list) -> tuple[list, list]:
    """The legacy Apply ControlNet node's controls (flagged `control_apply_to_uncond`) copied onto the negative side
    as ComfyUI's sampler does it (`samplers.process_conds` with `apply_empty_x_to_equal_area`): unless a negative
    entry has a control already, the i-th flagged positive control goes onto a copy of the (i mod n)-th negative
    entry without an area; the flag is then spent. Malformed entries are left for the sampler's own checks."""
    def options(entry):
        return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict) else None

    flagged = [entry for entry in positive if (options(entry) or {}).get("control_apply_to_uncond") is True]
    if not flagged:
        return positive, negative
    flagged_ids = {id(entry) for entry in flagged}
    spent = [[entry[0], {**entry[1], "control_apply_to_uncond": False}] if id(entry) in flagged_ids else entry
             for entry in positive]
    cond_controls = [o["control"] for _, o in flagged if "area" not in o and o.get("control") is not None]
    negative = list(negative)
    without_area = [(i, entry) for i, entry in enumerate(negative)
                    if options(entry) is not None and "area" not in entry[1]]
    if not without_area or any(o.get("control") is not None for _, (_, o) in without_area):
        return spent, negative
    for index, control in enumerate(cond_controls):
        # ComfyUI copies the slot's original entry each time, so with more controls than slots the last one wins.
        slot, (context, entry_options) = without_area[index % len(without_area)]
        negative[slot] = [context, {**entry_options, "control": control}]
    return spent, negative


def adapt_comfy_controls(positive: list, negative: list) -> tuple[list, list, list]:
    """(positive, negative, ComfyUI controls): the conditionings with each of ComfyUI's own control objects replaced
    by one core adapter (entries sharing an object share its adapter, so they still batch together; the legacy
    Apply ControlNet's are first copied to the negative side as ComfyUI does), and the list of those objects."""
    control_class = _comfy_class("comfy.controlnet", "ControlBase")
    if control_class is None:
        return positive, negative, []
    if isinstance(positive, list) and isinstance(negative, list):
        positive, negative = _controls_to_uncond(positive, negative)
    conditionings = (positive, negative)
    adapters, out = {}, []
    for conditioning in conditionings:
        if not isinstance(conditioning, list):
            out.append(conditioning)
            continue
        entries = []
        for entry in conditioning:
            options = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
            control = options.get("control") if isinstance(options, dict) else None
            if isinstance(control, control_class):
                link = control.previous_controlnet
                while link is not None:
                    if not isinstance(link, control_class):
                        raise ValueError(f"a ComfyUI ControlNet on this conditioning was applied on top of a "
                                         f"{type(link).__name__}, which ComfyUI's ControlNet cannot chain; apply all "
                                         "ControlNets with ComfyUI's Apply ControlNet, or all with this pack's")
                    link = link.previous_controlnet
                if control.get_extra_hooks():
                    raise ValueError("a ControlNet on this conditioning carries hooks (from a hook node), which "
                                     "these samplers cannot run; use ComfyUI's KSampler for it")
                if id(control) not in adapters:
                    adapters[id(control)] = _comfy_control_adapter()(control)
                entry = [entry[0], {**options, "control": adapters[id(control)]}]
            entries.append(entry)
        out.append(entries)
    return out[0], out[1], [adapter.control for adapter in adapters.values()]


def control_patchers(controls: Sequence) -> list:
    """The ModelPatchers of ComfyUI's control objects' networks, to load with the UNet."""
    return [patcher for control in controls for patcher in control.get_models()]


def control_memory(controls: Sequence, dtype: torch.dtype) -> int:
    return int(sum(control.inference_memory_requirements(dtype) for control in controls))


def pre_run_controls(controls: Sequence, patcher) -> None:
    """ComfyUI's `pre_run` of each control on the MODEL's diffusion model, with its percent -> sigma function."""
    base_model = patcher.model
    model_sampling = base_model.model_sampling
    for control in controls:
        control.pre_run(base_model, lambda percent: model_sampling.percent_to_sigma(percent))


def cleanup_controls(controls: Sequence) -> None:
    for control in controls:
        control.cleanup()
