"""The API-format workflows in api_workflows/ fit the pack's node schemas as registered in a real ComfyUI."""

from __future__ import annotations

import json

import pytest

from .conftest import REPO

EXAMPLES = sorted((REPO / "api_workflows").glob("*_api.json"))
FILE_CHOICES = {"source", "unet_name", "calibration"}  # dropdowns of the user's model files


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_inputs_match_the_pack_schemas(pack, example):
    classes = pack[0]
    for node_id, node in json.loads(example.read_text()).items():
        if not node["class_type"].startswith("FP8Scaled"):
            continue  # ComfyUI's own nodes
        inputs = {i.id: i for i in classes[node["class_type"]].GET_SCHEMA().inputs}
        given = node["inputs"]
        assert set(given) <= set(inputs), f"node {node_id}: unknown inputs {set(given) - set(inputs)}"
        required = {name for name, i in inputs.items() if not i.optional}
        assert required <= set(given), f"node {node_id}: missing inputs {required - set(given)}"
        for name, value in given.items():
            options = getattr(inputs[name], "options", None)
            if options and name not in FILE_CHOICES and not isinstance(value, list):  # a list is a link
                assert value in options, f"node {node_id}: {name}={value!r} is not one of {options}"
