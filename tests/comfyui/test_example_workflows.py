"""The templates in example_workflows/ (and their API twins in api_workflows/) against the node
definitions of a real ComfyUI with this pack: generated from the current inputs, every widget value in
its place and valid, every link joining an output to an input of its type."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from .conftest import COMFYUI_PATH
from .workflows import API, NOTE, TEMPLATES, WORKFLOWS, api_prompt, extra_node_definitions, slots, ui_workflow

CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FILE_CHOICES = {"source", "unet_name", "lora_name", "clip_name1", "clip_name2"}  # the user's model files
CONVERTERS = {"FP8ScaledConvertFile", "FP8ScaledConvertModel"}
REGENERATE = "regenerate with: COMFYUI_PATH=... python tests/comfyui/workflows.py --thumbnails"


@pytest.fixture(scope="module")
def definitions(pack):
    return extra_node_definitions(importlib.import_module("nodes"), Path(COMFYUI_PATH))


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_templates_are_generated_from_the_current_nodes(definitions, workflow):
    template = json.loads((TEMPLATES / f"{workflow.name}.json").read_text())
    assert template == ui_workflow(workflow, definitions), REGENERATE
    twin = json.loads((API / f"{workflow.name}_api.json").read_text())
    assert twin == api_prompt(workflow, definitions), REGENERATE


def _valid(slot, value) -> bool:
    config = slot.config
    if slot.type == "COMBO":
        return slot.name in FILE_CHOICES or value in config["options"]
    if slot.type == "BOOLEAN":
        return isinstance(value, bool)
    if slot.type == "STRING":
        return isinstance(value, str)
    number = int if slot.type == "INT" else (int, float)
    inside = config.get("min", value) <= value <= config.get("max", value) if isinstance(value, number) else False
    return not isinstance(value, bool) and inside


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.json")), ids=lambda p: p.name)
def test_template_fits_the_node_definitions(definitions, path):
    template = json.loads(path.read_text())
    nodes = {node["id"]: node for node in template["nodes"]}
    assert template["last_node_id"] >= max(nodes)
    for node in nodes.values():
        if node["type"] == NOTE:
            assert [type(v) for v in node["widgets_values"]] == [str]
            continue
        every = slots(definitions[node["type"]])
        widgets = [s for s in every if s.is_widget]
        sockets = [s for s in every if not s.is_widget]
        assert [i["name"] for i in node["inputs"]] == [s.name for s in sockets + widgets], node["type"]
        assert [i["type"] for i in node["inputs"]] == [s.type for s in sockets + widgets], node["type"]
        values = iter(node["widgets_values"])
        for slot in widgets:
            value = next(values)
            assert _valid(slot, value), f"{node['type']}.{slot.name} = {value!r}"
            if slot.control:
                assert next(values) in CONTROL_VALUES
        assert next(values, None) is None, f"{node['type']}: more widget values than widgets"
        unlinked = [
            i["name"] for i, s in zip(node["inputs"], sockets, strict=False) if not s.optional and i["link"] is None
        ]
        assert not unlinked, f"{node['type']}: required inputs without a link: {unlinked}"
        if node["type"] in CONVERTERS:  # the recommended settings: no learned rounding in a template
            assert dict(zip([s.name for s in widgets], node["widgets_values"], strict=False))["rounding"] != "learned"

    link_ids = [link[0] for link in template["links"]]
    assert len(set(link_ids)) == len(link_ids) and template["last_link_id"] >= max(link_ids, default=0)
    for link_id, source, output, target, input_slot, kind in template["links"]:
        assert link_id in (nodes[source]["outputs"][output]["links"] or [])
        assert nodes[source]["outputs"][output]["type"] == kind
        entry = nodes[target]["inputs"][input_slot]
        assert entry["link"] == link_id and entry["type"] in (kind, "*"), (entry, kind)
    for node in nodes.values():  # no dangling ends
        assert all(i["link"] in link_ids for i in node["inputs"] if i["link"] is not None)
        assert all(set(o["links"] or []) <= set(link_ids) for o in node["outputs"])
