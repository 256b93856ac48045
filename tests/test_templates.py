"""What ComfyUI serves as this pack's Templates: UI-format workflows, each with the thumbnail the page asks for.

ComfyUI (``app/custom_node_manager.py``) lists every ``*.json`` in a pack folder named
``example_workflows`` (or ``example``, ``examples``, ``workflow``, ``workflows``) as a template, and the
frontend shows ``<name>.jpg`` on its card. An API-format file there appears as a broken template.
Checked against the node definitions in ``tests/comfyui/test_example_workflows.py`` (needs ComfyUI).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVED_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
TEMPLATES = sorted((ROOT / "example_workflows").glob("*.json"))
MAX_THUMBNAIL = 100 * 1024


def test_only_example_workflows_is_served_as_templates():
    assert [name for name in SERVED_FOLDERS if (ROOT / name).exists()] == ["example_workflows"]
    assert TEMPLATES


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_each_template_is_a_ui_workflow_with_a_thumbnail(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4 and workflow["nodes"] and isinstance(workflow["links"], list)
    assert all(
        {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values"} <= set(n) for n in workflow["nodes"]
    )
    thumbnail = path.with_suffix(".jpg")
    data = thumbnail.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and len(data) < MAX_THUMBNAIL  # a JPEG, small


def test_each_template_has_its_api_twin():
    twins = sorted(p.name.removesuffix("_api.json") for p in (ROOT / "api_workflows").glob("*_api.json"))
    assert twins == [p.stem for p in TEMPLATES]
    for twin in (ROOT / "api_workflows").glob("*_api.json"):
        prompt = json.loads(twin.read_text())
        assert all({"class_type", "inputs"} <= set(node) for node in prompt.values())
