"""NaN and infinities pass every `<`/`>` range check, ComfyUI's own included: each node's VALIDATE_INPUTS refuses
them for every FLOAT input, in a sentence, before anything runs (and the node refuses them on a direct call)."""

import inspect
import math

import pytest

import nodes
from nodes._shared import float_inputs
from tests._nodes_helpers import node

FLOAT_INPUTS = [(name, input_name) for name, cls in sorted(nodes.NODE_CLASS_MAPPINGS.items())
                for input_name in float_inputs(cls)]
# ComfyUI repeats a VALIDATE_INPUTS failure once per input its signature names, so each node's check names one
# input (tests/nodes/test_nodes.py): the main FLOAT input is refused at queue time, the others (denoise,
# strength_clip) by the node itself before any work (test_direct_calls_refuse_nan_before_any_work).
QUEUE_CHECKED = [(name, input_name) for name, input_name in FLOAT_INPUTS
                 if input_name in inspect.getfullargspec(nodes.NODE_CLASS_MAPPINGS[name].VALIDATE_INPUTS).args]


def _default(cls, input_name):
    spec = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
    return spec[input_name][1]


def test_the_pack_has_float_inputs_to_check():
    assert {input_name for _, input_name in FLOAT_INPUTS} >= {"cfg", "denoise", "aesthetic_score", "strength_model",
                                                               "strength_clip"}


def test_every_node_with_float_inputs_checks_one_at_queue_time():
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if float_inputs(cls):
            assert any(entry[0] == name for entry in QUEUE_CHECKED), name


@pytest.mark.parametrize("name, input_name", QUEUE_CHECKED)
def test_every_float_input_is_validated_for_finite_values(name, input_name):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    assert validate is not None, f"{name} has FLOAT inputs but no VALIDATE_INPUTS"
    # ComfyUI passes VALIDATE_INPUTS only the inputs its signature names.
    assert input_name in inspect.getfullargspec(validate).args, f"{name}.VALIDATE_INPUTS does not see {input_name}"
    options = _default(cls, input_name)
    assert validate(**{input_name: options["default"]}) is True
    for bad in (math.nan, math.inf, -math.inf):
        message = validate(**{input_name: bad})
        assert isinstance(message, str) and f"{input_name} must be a finite number" in message, (name, bad)
        assert "type a number into the widget" in message
    # Naming the input in VALIDATE_INPUTS turns ComfyUI's own range check off for it: ours must cover the range.
    if "max" in options:
        assert "at most" in validate(**{input_name: options["max"] + 1})
    if "min" in options:
        assert "at least" in validate(**{input_name: options["min"] - 1})


def test_direct_calls_refuse_nan_before_any_work():
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        node("BaseSampler").sample(None, [], [], {}, 0, 4, math.nan, "euler", "normal", 3)
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        node("RefinerSampler").sample(None, [], [], {}, 0, 4, math.inf, "euler", "normal", 3)
    with pytest.raises(ValueError, match="aesthetic_score must be a finite number"):
        node("AestheticScore").apply([], math.nan)
    with pytest.raises(ValueError, match="denoise must be a finite number"):
        node("BaseSampler").sample(None, [], [], {}, 0, 4, 8.0, "euler", "normal", 3, True, math.nan)
    with pytest.raises(ValueError, match="denoise must be a finite number"):
        node("RefinerSampler").sample(None, [], [], {}, 0, 4, 8.0, "euler", "normal", 0, math.nan)
