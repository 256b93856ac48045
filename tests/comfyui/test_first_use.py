"""What a first-time user meets in the ComfyUI page, in headless Chromium against a real server.

Every template opens from the Templates dialog with its widget values and links intact; a conversion
queued with the Run button shows its progress text changing while one slow tensor is rounded; the
Cancel button shows "Cancelling…" and then "Cancelled" within seconds; a finished conversion names
the folder it saved into and the Inspect node shows its report. Each step is screenshotted into
``FP8_UI_SHOTS`` (a folder; the test's temporary folder when unset).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .browser import comfy_page, fit, open_template, open_templates_dialog
from .test_web import SOURCE, server  # noqa: F401 - the server fixture, started for this module
from .workflows import TEMPLATES

CONVERT = "fp8_convert_diffusion_model_file"  # its convert node's path feeds an Inspect node
# Every state the converter's and the Inspect node's status boxes go through, with their text.
WATCH = """() => {
  window.__fp8Log = [];
  new MutationObserver(() => {
    for (const box of document.querySelectorAll(".fp8-scaled-status")) {
      const last = window.__fp8Log.findLast((e) => e.box === box);
      if (!last || last.state !== box.dataset.state || last.text !== box.value) {
        window.__fp8Log.push({ box, state: box.dataset.state, text: box.value, at: performance.now() });
      }
    }
  }).observe(document.body, { subtree: true, attributes: true, childList: true, characterData: true });
}"""
SET_WIDGETS = """([type, values]) => {
  const node = window.app.graph.nodes.find((n) => n.type === type);
  for (const [name, value] of Object.entries(values)) node.widgets.find((w) => w.name === name).value = value;
  return String(node.id);
}"""
STATUS = """(type) => {
  const node = window.app.graph.nodes.find((n) => n.type === type);
  const widget = node?.widgets?.find((w) => w.name === "fp8_status");
  return widget ? { state: widget.element.dataset.state, text: widget.value } : null;
}"""


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FP8_UI_SHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _normalized(workflow: dict) -> tuple[dict, list]:
    """Widget values per node id and the links, ids as strings (the frontend may keep either)."""
    values = {str(n["id"]): n.get("widgets_values") for n in workflow["nodes"]}
    links = sorted([str(link[0]), str(link[1]), link[2], str(link[3]), link[4], link[5]] for link in workflow["links"])
    return values, links


def test_every_template_opens_from_the_templates_dialog(server, tmp_path):  # noqa: F811 - the imported fixture
    url, _ = server
    shots = _shots(tmp_path)
    with comfy_page(url, tmp_path / "profile") as page:
        for index, path in enumerate(sorted(TEMPLATES.glob("*.json"))):
            open_templates_dialog(page)
            if index == 0:
                page.screenshot(path=str(shots / "01_templates_dialog.png"))
            open_template(page, path.stem)
            fit(page)
            page.screenshot(path=str(shots / f"02_template_{path.stem}.png"))
            opened = page.evaluate("() => window.app.graph.serialize()")
            assert _normalized(opened) == _normalized(json.loads(path.read_text())), path.name
            assert page.get_by_text("Couldn't open the template").count() == 0
        assert not page.errors, page.errors


def test_convert_cancel_and_inspect_from_the_page(server, tmp_path):  # noqa: F811 - the imported fixture
    url, base = server
    shots = _shots(tmp_path)
    with comfy_page(url, tmp_path / "profile") as page:
        open_templates_dialog(page)
        open_template(page, CONVERT)
        fit(page)
        page.evaluate(WATCH)
        slow = {"source": SOURCE, "filename_prefix": "first_use/slow", "rounding": "learned", "num_iter": 10000}
        page.evaluate(SET_WIDGETS, ["FP8ScaledConvertFile", {**slow, "calib_samples": 512}])
        page.get_by_role("button", name="Run", exact=True).first.click()

        # progress inside one slow tensor: the same tensor named while its share and time move on
        page.wait_for_function(
            f"() => ({STATUS})('FP8ScaledConvertFile')?.text.includes('current ')", timeout=120_000, polling=100
        )
        page.screenshot(path=str(shots / "03_progress_first.png"))
        first = page.evaluate(STATUS, "FP8ScaledConvertFile")["text"]
        current = next(line for line in first.splitlines() if line.startswith("current "))
        tensor = current.split()[1]
        page.wait_for_function(
            f"""() => {{
              const text = ({STATUS})('FP8ScaledConvertFile').text;
              return text !== {json.dumps(first)} && text.includes({json.dumps("current   " + tensor + "  (")});
            }}""",
            timeout=30_000,
            polling=100,
        )
        page.screenshot(path=str(shots / "04_progress_later.png"))
        later = page.evaluate(STATUS, "FP8ScaledConvertFile")["text"]

        # Cancel: "Cancelling…" at once, then "Cancelled"
        page.get_by_role("button", name="Cancel current run").click()
        pressed = time.monotonic()
        page.wait_for_function(
            f"() => ['cancelling', 'cancelled'].includes(({STATUS})('FP8ScaledConvertFile').state)", polling=20
        )
        page.screenshot(path=str(shots / "05_cancelling.png"))
        page.wait_for_function(f"() => ({STATUS})('FP8ScaledConvertFile').state === 'cancelled'", polling=20)
        cancelled_after = time.monotonic() - pressed
        page.screenshot(path=str(shots / "06_cancelled.png"))
        log = page.evaluate("() => window.__fp8Log.map(({ box, ...entry }) => entry)")

        # a quick conversion to the end; the Inspect node shows the written file's report
        page.evaluate(SET_WIDGETS, ["FP8ScaledConvertFile", {"filename_prefix": "first_use/fast", "rounding": "auto"}])
        page.get_by_role("button", name="Run", exact=True).first.click()
        page.wait_for_function(f"() => ({STATUS})('FP8ScaledInspect')?.state === 'done'", timeout=300_000)
        fit(page)
        page.screenshot(path=str(shots / "07_done_and_inspected.png"))
        done = page.evaluate(STATUS, "FP8ScaledConvertFile")
        inspected = page.evaluate(STATUS, "FP8ScaledInspect")
        assert not page.errors, page.errors

    assert "(learned" in current and tensor in later and later != first  # "(learned, 1s)" or "(learned 3%, 2s)"
    states = [entry["state"] for entry in log]
    cancelling = next(e for e in log if e["state"] == "cancelling")
    cancelled = next(e for e in log if e["state"] == "cancelled")
    assert states.index("cancelling") < states.index("cancelled")
    assert cancelling["text"].startswith("Cancelling…") and cancelled["text"].startswith("Cancelled")
    assert cancelled["at"] - cancelling["at"] < 2000 and cancelled_after < 3  # milliseconds, seconds
    folder = base / "models" / "diffusion_models" / "first_use"
    assert not list(folder.glob("slow_*"))  # nothing saved by the cancelled run
    assert done["state"] == "done" and f"in        {folder}" in done["text"], done["text"]
    assert (folder / "fast_00001_.safetensors").is_file()
    assert f"file      {folder / 'fast_00001_.safetensors'}" in inspected["text"], inspected["text"]
    assert "format    comfy" in inspected["text"] and "double_blocks." in inspected["text"]
    assert "rel.err" not in inspected["text"]  # no original given: no error column
