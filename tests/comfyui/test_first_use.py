"""What a first-time user meets in the ComfyUI page, in headless Chromium against a real server.

Every template opens from the Templates dialog with its widget values and links intact; a conversion
queued with the Run button shows its progress text changing while one slow tensor is rounded; the
Cancel button shows "Cancelling…" and then "Cancelled" within seconds; a finished conversion names
the folder it saved into and the Inspect node shows its report; in the Nodes 2.0 design the
advanced options are folded behind "Show advanced inputs". Each step is screenshotted into
``FP8_UI_SHOTS`` (a folder; the test's temporary folder when unset).

The frontend is the installed ``comfyui-frontend-package``, or the one whose ``static`` folder
``FP8_FRONTEND_ROOT`` names (see ``test_web``). Both supported versions, e.g.::

    COMFYUI_PATH=~/ComfyUI FP8_UI_SHOTS=shots-1.48 python -m pytest tests/comfyui/test_first_use.py
    pip install --target ~/frontend-1.58.1 --no-deps comfyui-frontend-package==1.58.1
    FP8_FRONTEND_ROOT=~/frontend-1.58.1/comfyui_frontend_package/static COMFYUI_PATH=~/ComfyUI \\
        FP8_UI_SHOTS=shots-1.58 python -m pytest tests/comfyui/test_first_use.py
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from quant_core.options import ADVANCED, NODE, OPTIONS

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
ADD_NODE = """(type) => {
  const app = window.app;
  app.graph.clear();
  const node = LiteGraph.createNode(type);
  node.pos = [140, 140];
  app.graph.add(node);
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  app.graph.setDirtyCanvas(true, true);
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
        fit(page)  # the status box made the node taller
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
    _assert_honest_etas([entry["text"] for entry in log if entry["state"] == "running"])
    states = [entry["state"] for entry in log]
    cancelling = next(e for e in log if e["state"] == "cancelling")
    cancelled = next(e for e in log if e["state"] == "cancelled")
    assert states.index("cancelling") < states.index("cancelled")
    assert cancelling["text"].startswith("Cancelling…") and cancelled["text"].startswith("Cancelled")
    # milliseconds, seconds: "Cancelling…" stays up long enough to be read (700 ms), "Cancelled" follows at once
    assert 500 < cancelled["at"] - cancelling["at"] < 2000 and cancelled_after < 3
    folder = base / "models" / "diffusion_models" / "first_use"
    assert not list(folder.glob("slow_*"))  # nothing saved by the cancelled run
    assert done["state"] == "done" and f"in        {folder}" in done["text"], done["text"]
    assert (folder / "fast_00001_.safetensors").is_file()
    assert f"file      {folder / 'fast_00001_.safetensors'}" in inspected["text"], inspected["text"]
    assert "format    comfy" in inspected["text"] and "double_blocks." in inspected["text"]
    assert "rel.err" not in inspected["text"]  # no original given: no error column


def _seconds(text: str) -> int:
    """The panel's durations: "12s", "3m 04s", "1h 02m"."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)([hms])", text))


def _assert_honest_etas(texts: list[str]) -> None:
    """Inside the first weight the ETA is "estimating…" or at least what the weight itself still needs at
    the rate its share shows (share floored to whole percent, seconds rounded): never a promise the
    tensor being rounded already breaks, as the old "ETA 27s" on a weight of minutes did."""
    checked = 0
    for text in texts:
        inside = re.search(r"\(0 quantized.*\n.*\(learned (\d+)%, ([^)]+)\)\n.*ETA (.+)", text)
        if inside is None:
            continue
        share, seconds, eta = int(inside[1]), _seconds(inside[2]), inside[3].strip()
        if eta != "estimating…":
            assert _seconds(eta) >= (seconds - 0.5) * (100 - (share + 1)) / (share + 1) - 0.5, text
        checked += 1
    assert checked >= 2, texts


def test_advanced_inputs_fold_behind_show_advanced_inputs(server, tmp_path):  # noqa: F811 - the imported fixture
    """In the Nodes 2.0 design a new convert node shows the basic options only; "Show advanced inputs"
    unfolds the others (the classic canvas shows every input in both frontends)."""
    url, _ = server
    shots = _shots(tmp_path)
    advanced = {o.name for o in OPTIONS if NODE in o.fronts and o.group == ADVANCED}
    basic = {o.name for o in OPTIONS if NODE in o.fronts and o.group != ADVANCED and o.name != "calibration"}
    with comfy_page(url, tmp_path / "profile") as page:
        page.evaluate("() => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true)")
        try:
            node = page.evaluate(ADD_NODE, "FP8ScaledConvertFile")
            box = page.locator(f'[data-node-id="{node}"]')
            box.get_by_text("fp8_compute", exact=True).wait_for()
            folded = set(box.inner_text().splitlines())
            page.screenshot(path=str(shots / "08_advanced_folded.png"))
            box.get_by_role("button", name="Show advanced inputs").click()
            box.get_by_text("fp8_format", exact=True).wait_for()
            unfolded = set(box.inner_text().splitlines())
            page.screenshot(path=str(shots / "09_advanced_shown.png"))
        finally:
            page.evaluate("() => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")
        assert not page.errors, page.errors
    assert basic <= folded and not advanced & folded, sorted(advanced & folded)
    assert basic | advanced <= unfolded, sorted((basic | advanced) - unfolded)
