"""Wiring mistakes caught from the queued graph before the base samples (nodes/graph_checks.py), on the two-stage
example's API prompt with one link or widget changed."""

import copy
import json
from pathlib import Path

import pytest

from nodes import graph_checks
from nodes import sampling as node_sampling

EXAMPLE = json.loads((Path(__file__).resolve().parents[2] / "example_workflows" / "api" /
                      "sdxl_two_stage_txt2img_api.json").read_text())
BASE, REFINER = "7", "11"  # the samplers of the example


def _check(prompt, steps=25, end=20, scheduler="normal", hands_off=True):
    graph_checks.check_base_graph(prompt, BASE, steps, end, scheduler, hands_off, node_sampling._check_refiner)


def test_the_example_passes():
    _check(copy.deepcopy(EXAMPLE))
    assert graph_checks.refiners_fed_by(EXAMPLE, BASE) == [REFINER]
    assert graph_checks.conditioning_sources(EXAMPLE, BASE, "positive") == [("4", "base")]  # through micro-cond.
    assert graph_checks.conditioning_sources(EXAMPLE, REFINER, "negative") == [("9", "refiner")]  # aesthetic score


def test_base_conditioning_into_the_refiner_is_caught_at_the_base():
    prompt = copy.deepcopy(EXAMPLE)
    prompt[REFINER]["inputs"]["positive"] = ["6", 0]
    with pytest.raises(ValueError, match=r"'Positive \(base\)' \(node 4\): this is base conditioning wired into "
                                         r"the refiner model"):
        _check(prompt)


def test_refiner_conditioning_into_the_base_is_caught():
    prompt = copy.deepcopy(EXAMPLE)
    prompt["20"] = {"class_type": "ConditioningCombine",
                    "inputs": {"conditioning_1": ["5", 0], "conditioning_2": ["9", 0]}}
    prompt[BASE]["inputs"]["negative"] = ["20", 0]
    with pytest.raises(ValueError, match="negative conditioning from 'Negative \\(refiner\\)' \\(node 9\\): this is "
                                         "refiner conditioning wired into the base model"):
        _check(prompt, hands_off=False)


def test_refiner_set_to_another_handoff_is_caught_even_through_a_core_latent_node():
    prompt = copy.deepcopy(EXAMPLE)
    prompt["21"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": [BASE, 0], "amount": 2}}
    prompt[REFINER]["inputs"].update(latent_image=["21", 0], start_at_step=19)
    with pytest.raises(ValueError, match=r"hands off at step 20 of 25 \(scheduler normal\), but 'RefinerSampler' "
                                         r"\(node 11\) is set to start at step 19 of 25"):
        _check(prompt)
    prompt[REFINER]["inputs"].update(start_at_step=20, scheduler="karras")
    with pytest.raises(ValueError, match="scheduler karras"):
        _check(prompt)
    prompt[REFINER]["inputs"].update(scheduler="normal", start_at_step=30)
    with pytest.raises(ValueError, match=r"node 11\), fed by this base sampler: start_at_step \(K = 30\) is past"):
        _check(prompt)


def test_values_linked_from_other_nodes_are_left_to_the_refiner_and_no_handoff_checks_nothing_downstream():
    prompt = copy.deepcopy(EXAMPLE)
    prompt[REFINER]["inputs"]["start_at_step"] = ["30", 0]
    _check(prompt)
    prompt[REFINER]["inputs"].update(start_at_step=3, positive=["6", 0])
    _check(prompt, hands_off=False)  # the base finishes alone: what follows is not a handoff
    graph_checks.check_base_graph(None, None, 25, 20, "normal", True, node_sampling._check_refiner)  # direct call
