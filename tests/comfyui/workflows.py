"""The pack's example workflows, built from the nodes' definitions as ComfyUI sends them to the page.

ComfyUI serves a pack's ``example_workflows/`` folder as Templates (``app/custom_node_manager.py``:
``/workflow_templates`` lists every ``*.json`` there by name, the frontend opens it as a saved UI
workflow and shows ``<name>.jpg`` as its card). A UI workflow lists each node's widget values by
position, so the files are generated here from the node definitions (``/object_info``) rather than
written by hand: a changed input order or default changes the generated file, and
``test_example_workflows.py`` fails until they are regenerated. ``api_workflows/`` holds the same
graphs in API format, to queue with ``/prompt`` (that folder's name is not one ComfyUI serves as
templates, which API files are not).

Regenerate (and, with ``--thumbnails``, screenshot each template in the real frontend through a
local ComfyUI server and the system Chromium, as ``test_web.py`` does)::

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python tests/comfyui/workflows.py [--thumbnails]
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "example_workflows"
API = REPO / "api_workflows"
THUMBNAIL = ".jpg"  # the frontend asks for <name>.jpg for every custom-node template
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these unless told otherwise
NOTE = "Note"  # a frontend-only node (no server definition): the template's instructions
OPTIONAL_SHAPE = 7  # how the frontend marks an optional input slot
# ComfyUI's own nodes used by the templates, beyond nodes.py: their modules in comfy_extras/
EXTRA_NODE_MODULES = ("nodes_flux.py", "nodes_sd3.py")


@dataclass
class Node:
    """One node of a template: its widget values where they differ from the defaults, and its links
    (input name -> (source node id, output slot))."""

    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    text: str = ""  # a Note's text


@dataclass
class Workflow:
    name: str
    nodes: list[Node]


def _note(id: int, pos: tuple[int, int], *lines: str) -> Node:
    return Node(id, NOTE, pos, text="\n".join(lines))


FLUX = "flux1-dev.safetensors"
WORKFLOWS = [
    Workflow(
        "fp8_convert_diffusion_model_file",
        [
            Node(1, "FP8ScaledConvertFile", (420, 60), {"source": f"diffusion_models/{FLUX}"}),
            Node(2, "FP8ScaledInspect", (880, 60), links={"path": (1, 0)}),
            _note(
                3,
                (40, 60),
                "Convert a diffusion model file to FP8 scaled (about half the size of bf16).",
                "",
                "1. Pick your model in 'source' (files in models/diffusion_models, models/unet, "
                "models/checkpoints, models/text_encoders).",
                "2. Queue. The node shows the tensor being rounded, elapsed time and ETA; Cancel stops "
                "within a second and saves nothing.",
                "3. The file is saved next to the source, under filename_prefix "
                "(models/diffusion_models/fp8_scaled/ComfyUI_00001_.safetensors); the summary on the node "
                "names the full path. 'Load Diffusion Model' lists it after a refresh.",
                "",
                "Inspect reads the saved file back and shows its report on the node.",
            ),
        ],
    ),
    Workflow(
        "fp8_convert_text_encoder_file",
        [
            Node(
                1,
                "FP8ScaledConvertFile",
                (420, 60),
                {"source": "text_encoders/t5xxl_fp16.safetensors", "filename_prefix": "t5xxl_fp8_scaled"},
            ),
            Node(2, "FP8ScaledInspect", (880, 60), links={"path": (1, 0)}),
            _note(
                3,
                (40, 60),
                "Convert a text encoder (T5-XXL, UMT5, Qwen, Llama…) to FP8 scaled.",
                "",
                "The recommended settings: rounding 'auto' is round-to-nearest, or GPTQ where a "
                "calibration file (from 'Record FP8 Text Encoder Calibration') covers the layers. "
                "Norms, embeddings and biases stay in full precision (preset auto detects the encoder).",
                "",
                "The file is saved next to the source (models/text_encoders/t5xxl_fp8_scaled_00001_.safetensors); "
                "load it with the CLIP loaders as usual.",
            ),
        ],
    ),
    Workflow(
        "fp8_bake_lora_into_model",
        [
            Node(1, "UNETLoader", (40, 60), {"unet_name": FLUX}),
            Node(2, "LoraLoaderModelOnly", (40, 230), {"lora_name": "my_style_lora.safetensors"}, {"model": (1, 0)}),
            Node(
                3,
                "FP8ScaledConvertModel",
                (420, 60),
                {"filename_prefix": "fp8_scaled/flux1-dev-my-style"},
                {"model": (2, 0)},
            ),
            _note(
                4,
                (40, 420),
                "Bake a LoRA into a model and save it as FP8 scaled: one weight at a time through ComfyUI's "
                "own patching, never a second copy of the model.",
                "",
                "Saved into models/diffusion_models/fp8_scaled/; 'Load Diffusion Model' lists it after a refresh.",
            ),
        ],
    ),
    Workflow(
        "fp8_calibrate_on_your_prompts",
        [
            Node(1, "UNETLoader", (40, 60), {"unet_name": FLUX}),
            Node(
                2,
                "DualCLIPLoader",
                (40, 220),
                {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"},
            ),
            Node(
                3,
                "CLIPTextEncode",
                (420, 220),
                {"text": "a watercolor lighthouse on a cliff at dawn, seagulls, soft light"},
                {"clip": (2, 0)},
            ),
            Node(4, "FluxGuidance", (820, 220), {"guidance": 3.5}, {"conditioning": (3, 0)}),
            Node(5, "CLIPTextEncode", (420, 460), {"text": ""}, {"clip": (2, 0)}),
            Node(6, "EmptySD3LatentImage", (420, 660), {"width": 1024, "height": 1024, "batch_size": 2}),
            Node(7, "FP8ScaledRecordCalibration", (420, 60), {"max_memory_mib": 16384}, {"model": (1, 0)}),
            Node(
                8,
                "KSampler",
                (1140, 60),
                {"seed": 42, "steps": 20, "cfg": 1.0},
                {"model": (7, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
            ),
            Node(
                9,
                "FP8ScaledSaveCalibration",
                (1520, 60),
                {"filename_prefix": "flux1-dev"},
                {"recording": (7, 1), "after": (8, 0)},
            ),
            Node(
                10,
                "FP8ScaledConvertModel",
                (1900, 60),
                {"filename_prefix": "fp8_scaled/flux1-dev-calibrated"},
                {"model": (1, 0), "calibration_path": (9, 0)},
            ),
            _note(
                11,
                (820, 420),
                "Calibrate on your own prompts: sampling through 'Record FP8 Calibration' records what each "
                "layer sees; 'Save FP8 Calibration' writes it after the sampler ran; the convert node then "
                "rounds the recorded layers with GPTQ (rounding 'auto').",
                "",
                "For many prompts: turn on keep_recording and queue one run per prompt (the seed "
                "re-rolls each run, so the sampler runs again).",
            ),
        ],
    ),
]


# --------------------------------------------------------------------------------------------------
# node definitions
# --------------------------------------------------------------------------------------------------


def node_definitions(classes: dict) -> dict[str, dict]:
    """``/object_info`` for ``classes`` (``nodes.NODE_CLASS_MAPPINGS``), as ComfyUI's ``server.py``
    builds it: the schema API's own description, or that of a classic node."""
    definitions = {}
    for name, cls in classes.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            definitions[name] = cls.GET_NODE_INFO_V1()
            continue
        inputs = cls.INPUT_TYPES()
        definitions[name] = {
            "input": inputs,
            "input_order": {key: list(value) for key, value in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        }
    return definitions


@dataclass
class Slot:
    name: str
    type: str
    config: dict
    optional: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.config.get("forceInput")

    @property
    def control(self) -> str | None:
        """The value of the control widget the frontend adds after this one (``control_after_generate``)."""
        control = self.config.get("control_after_generate", self.type == "INT" and self.name in SEED_NAMES)
        if not control:
            return None
        return control if isinstance(control, str) else "randomize"


def slots(definition: dict) -> list[Slot]:
    """The node's inputs in the order the frontend creates them: required, then optional."""
    result = []
    for group in ("required", "optional"):
        for name in definition["input_order"].get(group, []):
            kind, *rest = definition["input"][group][name]
            config = rest[0] if rest else {}
            if isinstance(kind, list):  # a classic node's combo: the list of choices
                kind, config = "COMBO", {**config, "options": kind}
            result.append(Slot(name, kind, config, group == "optional"))
    return result


def default(slot: Slot):
    if "default" in slot.config:
        return slot.config["default"]
    if slot.type == "COMBO" and slot.config.get("options"):
        return slot.config["options"][0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(slot.type)


# --------------------------------------------------------------------------------------------------
# the two formats
# --------------------------------------------------------------------------------------------------


def ui_workflow(workflow: Workflow, definitions: dict[str, dict]) -> dict:
    """The workflow as the frontend saves it (version 0.4)."""
    links, outgoing = _links(workflow, definitions)
    nodes = [_ui_node(node, order, definitions, links, outgoing) for order, node in enumerate(_ordered(workflow))]
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"fp8_scaled/{workflow.name}")),
        "revision": 0,
        "last_node_id": max(node.id for node in workflow.nodes),
        "last_link_id": len(links),
        "nodes": sorted(nodes, key=lambda node: node["id"]),
        "links": [list(link) for link in links],
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},
        "version": 0.4,
    }


def api_prompt(workflow: Workflow, definitions: dict[str, dict]) -> dict:
    """The workflow as a ``/prompt`` body's ``prompt``: widget values by name, links as [id, slot]."""
    prompt = {}
    for node in workflow.nodes:
        if node.type == NOTE:
            continue
        inputs = {}
        for slot in slots(definitions[node.type]):
            if slot.name in node.links:
                source, output = node.links[slot.name]
                inputs[slot.name] = [str(source), output]
            elif slot.is_widget:
                inputs[slot.name] = node.widgets.get(slot.name, default(slot))
        prompt[str(node.id)] = {"class_type": node.type, "inputs": inputs}
    return prompt


def _ordered(workflow: Workflow) -> list[Node]:
    """Nodes in execution order (sources first), the frontend's ``order``."""
    done: list[Node] = []
    pending = list(workflow.nodes)
    while pending:
        ready = [n for n in pending if all(src in {d.id for d in done} for src, _ in n.links.values())]
        if not ready:
            raise ValueError(f"{workflow.name}: the links form a cycle")
        done += ready
        pending = [n for n in pending if n not in ready]
    return done


def _links(workflow: Workflow, definitions: dict[str, dict]):
    """[id, source, output slot, target, input slot, type] for every link, and link ids per output."""
    by_id = {node.id: node for node in workflow.nodes}
    links, outgoing = [], {}
    for node in workflow.nodes:
        inputs = _ui_inputs(definitions[node.type]) if node.type != NOTE else []
        for name, (source, output) in node.links.items():
            link_id = len(links) + 1
            kind = definitions[by_id[source].type]["output"][output]
            target_slot = next(i for i, slot in enumerate(inputs) if slot.name == name)
            links.append((link_id, source, output, node.id, target_slot, kind))
            outgoing.setdefault((source, output), []).append(link_id)
    return links, outgoing


def _ui_inputs(definition: dict) -> list[Slot]:
    """Input slots as the frontend lists them: sockets first, then one slot per widget."""
    every = slots(definition)
    return [s for s in every if not s.is_widget] + [s for s in every if s.is_widget]


def _ui_node(node: Node, order: int, definitions, links, outgoing) -> dict:
    if node.type == NOTE:
        return {
            "id": node.id,
            "type": NOTE,
            "pos": list(node.pos),
            "size": [360, 40 + 18 * _wrapped_lines(node.text, 52)],
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": [node.text],
            "color": "#432",
            "bgcolor": "#653",
        }
    definition = definitions[node.type]
    incoming = {link[3:5]: link[0] for link in links}
    inputs = []
    for index, slot in enumerate(_ui_inputs(definition)):
        entry = {"localized_name": slot.name, "name": slot.name}
        if slot.optional:
            entry["shape"] = OPTIONAL_SHAPE
        entry["type"] = slot.type
        if slot.is_widget:
            entry["widget"] = {"name": slot.name}
        entry["link"] = incoming.get((node.id, index))
        inputs.append(entry)
    unknown = set(node.widgets) - {s.name for s in slots(definition) if s.is_widget}
    if unknown:
        raise ValueError(f"{node.type}: no widgets named {sorted(unknown)}")
    values = []
    for slot in (s for s in slots(definition) if s.is_widget):
        values.append(node.widgets.get(slot.name, default(slot)))
        if slot.control:
            values.append(slot.control)
    outputs = [
        {"localized_name": name, "name": name, "type": kind, "links": outgoing.get((node.id, slot))}
        for slot, (kind, name) in enumerate(zip(definition["output"], definition["output_name"], strict=True))
    ]
    return {
        "id": node.id,
        "type": node.type,
        "pos": list(node.pos),
        "size": _size(node.type, definition),
        "flags": {},
        "order": order,
        "mode": 0,
        "inputs": inputs,
        "outputs": outputs,
        "properties": {"Node name for S&R": node.type},
        "widgets_values": values,
    }


def _size(kind: str, definition: dict) -> list[int]:
    """A first size; the frontend grows a node that is too small for its widgets when it loads it."""
    every = slots(definition)
    rows = max(len([s for s in every if not s.is_widget]), len(definition["output"]))
    widgets = [s for s in every if s.is_widget]
    tall = sum(1 for s in widgets if s.config.get("multiline"))
    width = 400 if kind.startswith("FP8Scaled") else 320
    return [width, 30 + 22 * rows + 24 * (len(widgets) + sum(1 for s in widgets if s.control)) + 60 * tall]


def _wrapped_lines(text: str, width: int) -> int:
    return sum(max(1, -(-len(line) // width)) for line in text.splitlines())


# --------------------------------------------------------------------------------------------------
# generating the files
# --------------------------------------------------------------------------------------------------


def comfyui_definitions(comfyui: Path) -> dict[str, dict]:
    """Import ComfyUI from ``comfyui`` and load this pack and the built-in extra nodes the templates use."""
    import asyncio
    import sys

    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args

    args.cpu = True
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(REPO)))
    return extra_node_definitions(nodes, comfyui)


def extra_node_definitions(nodes, comfyui: Path) -> dict[str, dict]:
    """The definitions of every node ComfyUI's ``nodes`` module has loaded, plus ``EXTRA_NODE_MODULES``."""
    import asyncio

    for module in EXTRA_NODE_MODULES:
        if not asyncio.run(
            nodes.load_custom_node(str(comfyui / "comfy_extras" / module), module_parent="comfy_extras")
        ):
            raise RuntimeError(f"ComfyUI's comfy_extras/{module} did not load")
    return node_definitions(nodes.NODE_CLASS_MAPPINGS)


def write(definitions: dict[str, dict]) -> list[Path]:
    """Write every template and its API twin; returns the template paths."""
    TEMPLATES.mkdir(exist_ok=True)
    API.mkdir(exist_ok=True)
    written = []
    for workflow in WORKFLOWS:
        path = TEMPLATES / f"{workflow.name}.json"
        path.write_text(dump(ui_workflow(workflow, definitions)))
        (API / f"{workflow.name}_api.json").write_text(dump(api_prompt(workflow, definitions)))
        written.append(path)
    return written


def dump(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    import argparse
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thumbnails", action="store_true", help="screenshot each template in the real frontend")
    options = parser.parse_args()
    comfyui = Path(os.environ["COMFYUI_PATH"]).resolve()
    for template in write(comfyui_definitions(comfyui)):
        print(template.relative_to(REPO))
    if options.thumbnails:
        import sys

        sys.path[:0] = [str(REPO), str(REPO / "tests")]
        from comfyui.browser import thumbnails  # noqa: E402 - needs the tests folder on the path

        for thumbnail in thumbnails([p for p in sorted(TEMPLATES.glob("*.json"))]):
            print(thumbnail.relative_to(REPO), thumbnail.stat().st_size, "bytes")
