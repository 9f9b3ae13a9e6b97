"""Wiring mistakes the queued graph already shows, found before any sampling starts.

ComfyUI validates each node on its own widget values (linked inputs are unknown then) and gives no node a view of
the graph at queue time. The first moment a node of this pack can see the links is when it executes, with the
prompt as a hidden input. The base sampler runs before its refiner, so it looks ahead: the refiner samplers its
latent feeds must continue its handoff (same N, K and scheduler) and must not be fed base conditioning; and its own
conditioning must not come from the refiner's text encoder. A mistake stops the run there, in one sentence naming
the nodes, instead of after the base has sampled (minutes on real SDXL).

The graph is ComfyUI's API prompt: {node id: {"class_type", "inputs": {name: value | [source id, slot]}}}.
"""

from __future__ import annotations

from collections.abc import Callable

from ._shared import node_id

BASE_ENCODE = node_id("TextEncodeBase")
REFINER_ENCODE = node_id("TextEncodeRefiner")
REFINER_SAMPLER = node_id("RefinerSampler")
ENCODER_STAGE = {BASE_ENCODE: "base", REFINER_ENCODE: "refiner"}
# Conditioning travels through inputs with these names (our micro-conditioning and aesthetic-score nodes, core
# ConditioningCombine / Concat / SetArea / SetTimestepRange, ControlNet apply nodes' positive/negative).
_CONDITIONING_INPUTS = ("positive", "negative")
# Core nodes that pass a latent on unchanged in its noise level, so a refiner behind them still continues the handoff.
_LATENT_PASS_THROUGH = {"RepeatLatentBatch": "samples", "LatentBatchSeedBehavior": "samples",
                        "SetLatentNoiseMask": "samples", "LatentFromBatch": "samples"}


def _is_link(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)


def _carries_conditioning(name: str) -> bool:
    return "conditioning" in name or name in _CONDITIONING_INPUTS


def _title(prompt: dict, node: str) -> str:
    entry = prompt.get(node, {})
    title = entry.get("_meta", {}).get("title") or entry.get("class_type", "?")
    return f"'{title}' (node {node})"


def conditioning_sources(prompt: dict, node: str, input_name: str) -> list[tuple[str, str]]:
    """The SDXL text-encode nodes the conditioning on `node`.`input_name` comes from, as (node id, stage), walking
    upstream through conditioning inputs only (a sampler or any other latent/image path ends the walk)."""
    found, seen = [], set()
    value = prompt.get(node, {}).get("inputs", {}).get(input_name)
    stack = [value[0]] if _is_link(value) else []
    while stack:
        current = stack.pop()
        if current in seen or current not in prompt:
            continue
        seen.add(current)
        class_type = prompt[current].get("class_type")
        if class_type in ENCODER_STAGE:
            found.append((current, ENCODER_STAGE[class_type]))
            continue
        for name, upstream in prompt[current].get("inputs", {}).items():
            if _carries_conditioning(name) and _is_link(upstream) and "latent_image" not in prompt[current]["inputs"]:
                stack.append(upstream[0])
    return found


def wrong_stage_conditioning(prompt: dict, sampler: str, stage: str) -> str | None:
    """A sentence when the positive or negative of `sampler` (a sampler of `stage`) comes from the other stage's
    text encoder; None when the links show no such mistake."""
    for role in _CONDITIONING_INPUTS:
        for encoder, found in conditioning_sources(prompt, sampler, role):
            if found != stage:
                return (f"{_title(prompt, sampler)} takes its {role} conditioning from {_title(prompt, encoder)}: "
                        f"this is {found} conditioning wired into the {stage} model. Encode the prompt with "
                        f"'SDXL {stage.capitalize()} Text Encode' on the {stage} checkpoint and wire that in")
    return None


def refiners_fed_by(prompt: dict, sampler: str) -> list[str]:
    """The SDXL Latent Refiner nodes whose latent_image is this sampler's output (directly or through core nodes that
    pass the latent on unchanged)."""
    refiners, frontier, seen = [], [sampler], set()
    while frontier:
        source = frontier.pop()
        if source in seen:
            continue
        seen.add(source)
        for node, entry in prompt.items():
            inputs, class_type = entry.get("inputs", {}), entry.get("class_type")
            if class_type == REFINER_SAMPLER and _is_link(inputs.get("latent_image")) \
                    and inputs["latent_image"][0] == source:
                refiners.append(node)
            passed = _LATENT_PASS_THROUGH.get(class_type)
            if passed and _is_link(inputs.get(passed)) and inputs[passed][0] == source:
                frontier.append(node)
    return sorted(refiners, key=lambda n: (len(n), n))


def check_base_graph(prompt: dict | None, base: str | None, steps: int, end_at_step: int | None, scheduler: str,
                     hands_off: bool, check_refiner: Callable[..., None]) -> None:
    """Raise ValueError, in one sentence, for a wiring mistake around the base sampler `base` that its links
    already show. `check_refiner(steps=, start_at_step=, denoise=)` is the refiner node's own settings check, run on
    each refiner's widget values now rather than after the base has sampled. Without a prompt (a direct call)
    there is nothing to look at."""
    if not isinstance(prompt, dict) or base not in prompt:
        return
    problem = wrong_stage_conditioning(prompt, base, "base")
    if problem:
        raise ValueError(problem)
    if not hands_off:
        return
    for refiner in refiners_fed_by(prompt, base):
        inputs = prompt[refiner].get("inputs", {})
        problem = wrong_stage_conditioning(prompt, refiner, "refiner")
        if problem:
            raise ValueError(problem)
        settings = {name: inputs.get(name) for name in ("steps", "start_at_step", "denoise", "scheduler")}
        if any(_is_link(value) for value in settings.values()):
            continue  # a value another node computes is known only when the refiner runs; it checks itself then
        try:
            check_refiner(steps=settings["steps"], start_at_step=settings["start_at_step"],
                          denoise=settings["denoise"])
        except ValueError as error:
            raise ValueError(f"{_title(prompt, refiner)}, fed by this base sampler: {error}") from None
        if settings["start_at_step"] == 0 or (settings["steps"], settings["start_at_step"], settings["scheduler"]) \
                != (steps, end_at_step, scheduler):
            raise ValueError(
                f"this base sampler hands off at step {end_at_step} of {steps} (scheduler {scheduler}), but "
                f"{_title(prompt, refiner)} is set to start at step {settings['start_at_step']} of "
                f"{settings['steps']} (scheduler {settings['scheduler']}): the noise levels would not match. Set "
                f"its steps = {steps}, start_at_step = {end_at_step} and scheduler {scheduler}, as here")
