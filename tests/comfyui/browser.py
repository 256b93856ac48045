"""The ComfyUI page in headless Chromium (Playwright driving the system Chromium, no browser download):
opened, its templates opened through the Templates dialog as a user does, screenshots taken.

Shared by ``test_first_use.py`` and the template thumbnails of ``workflows.py``.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .test_web import CHROMIUM_FLAGS, PACK, _chromium, comfyui_server
from .workflows import TEMPLATES, THUMBNAIL

# The graph's bounding box fitted into the canvas less ``[left, top, right, bottom]`` insets (LiteGraph:
# screen = (pos + offset) * scale).
FIT = """([left, top, right, bottom]) => {
  const app = window.app;
  const canvas = app.canvas;
  const nodes = app.graph.nodes;
  const x0 = Math.min(...nodes.map((n) => n.pos[0]));
  const y0 = Math.min(...nodes.map((n) => n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const [width, height] = [canvas.canvas.clientWidth - left - right, canvas.canvas.clientHeight - top - bottom];
  const scale = Math.min(width / (x1 - x0), height / (y1 - y0), 1.2);
  canvas.ds.scale = scale;
  const centre = (inset, room, extent, origin) => (inset + (room - scale * extent) / 2) / scale - origin;
  canvas.ds.offset = [centre(left, width, x1 - x0, x0), centre(top, height, y1 - y0, y0)];
  app.graph.setDirtyCanvas(true, true);
}"""
# What the page draws over the canvas: the side bar on the left, the tabs and the Run bar on top.
PAGE_INSETS = (64, 100, 0, 0)


CANVAS_JPEG = """([width, quality]) => {
  const source = window.app.canvas.canvas;
  window.app.canvas.show_info = false; // no frame statistics in the corner
  window.app.canvas.draw(true, true);
  const out = document.createElement("canvas");
  out.width = width;
  out.height = Math.round((width * source.height) / source.width);
  const context = out.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.drawImage(source, 0, 0, out.width, out.height);
  return out.toDataURL("image/jpeg", quality);
}"""


def require_browser() -> str:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium binary (set CHROMIUM or put chromium on PATH)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright Python package is not installed")
    return chromium


@contextlib.contextmanager
def comfy_page(url: str, profile: Path, viewport: tuple[int, int] = (1400, 900)) -> Iterator:
    """The ComfyUI page, loaded with this pack's extension; ``page.errors`` collects uncaught page errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=require_browser(),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.errors = []
            page.on("pageerror", lambda exc: page.errors.append(str(exc)))
            page.goto(url)
            page.wait_for_function("() => window.app?.graph && window.LiteGraph", timeout=120_000)
            page.wait_for_function(
                "() => window.app.extensions?.some((e) => e.name === 'fp8_scaled.status')", timeout=60_000
            )
            yield page
        finally:
            context.close()


def open_templates_dialog(page) -> None:
    """Workflow > Browse Templates, then the pack's entry under EXTENSIONS."""
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_role("dialog").get_by_text(PACK, exact=True).first.click()
    page.get_by_role("dialog").get_by_text("Showing", exact=False).first.wait_for()


def open_template(page, name: str) -> None:
    """Click the template's card in the open Templates dialog; wait until its graph is on the canvas."""
    expected = len(json.loads((TEMPLATES / f"{name}.json").read_text())["nodes"])
    page.get_by_role("dialog").get_by_text(name, exact=True).first.click()
    page.wait_for_function(
        "(n) => window.app.graph.nodes.length === n && !document.querySelector('[role=dialog] .pi-spin')",
        arg=expected,
        timeout=60_000,
    )


def fit(page, margin: int = 24, insets: tuple[int, int, int, int] = PAGE_INSETS) -> None:
    """The whole graph in view: the canvas less the page's bars (``insets``) and ``margin`` around."""
    page.wait_for_timeout(500)  # the frontend settles the loaded workflow's view first
    page.evaluate(FIT, [inset + margin for inset in insets])
    page.wait_for_timeout(300)  # one frame drawn


def canvas_image(page, width: int, quality: float) -> bytes:
    """The graph canvas alone (no menus), scaled to ``width`` pixels, as a JPEG."""
    data = page.evaluate(CANVAS_JPEG, [width, quality])
    return base64.b64decode(data.split(",", 1)[1])


def thumbnails(templates: list[Path], width: int = 800, quality: float = 0.8) -> list[Path]:
    """Screenshot each template's graph (the canvas only, fitted) as ``<name>.jpg`` next to it, through a
    local ComfyUI with placeholder files for the models the templates name (no "missing model" marks)."""
    from quant_core import io

    written = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        placeholder = scratch / "placeholder.safetensors"
        io.write_file(placeholder, {"weight": torch.zeros(1)})
        (scratch / "base").mkdir()
        with comfyui_server(placeholder, scratch / "base") as (url, base, _):
            for folder, name in _named_models(templates):
                (base / "models" / folder).mkdir(parents=True, exist_ok=True)
                (base / "models" / folder / name).write_bytes(placeholder.read_bytes())
            with comfy_page(url, scratch / "profile", viewport=(1600, 1000)) as page:
                for template in templates:
                    open_templates_dialog(page)
                    open_template(page, template.stem)
                    fit(page, insets=(0, 0, 0, 0))  # the canvas alone is drawn
                    thumbnail = template.with_suffix(THUMBNAIL)
                    thumbnail.write_bytes(canvas_image(page, width, quality))
                    written.append(thumbnail)
    return written


def _named_models(templates: list[Path]) -> set[tuple[str, str]]:
    """(folder, file) of every model file a template's loaders and convert nodes name."""
    folders = {"unet_name": "diffusion_models", "lora_name": "loras", "clip_name1": "text_encoders"}
    folders["clip_name2"] = "text_encoders"
    named = set()
    for template in templates:
        for node in json.loads(template.read_text())["nodes"]:
            widgets = [i["name"] for i in node["inputs"] if "widget" in i]
            for name, value in zip(widgets, node.get("widgets_values", []), strict=False):
                if name in folders:
                    named.add((folders[name], value))
                elif name == "source" and "/" in value:  # "folder/file", or none
                    named.add(tuple(value.split("/", 1)))
    return named
