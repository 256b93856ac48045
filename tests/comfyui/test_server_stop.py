"""ComfyUI's server stopped while a convert node writes: nothing half-written is left for long.

ComfyUI runs prompts on a daemon thread. Stopped with Ctrl-C, its main thread returns and the
interpreter exits with the conversion frozen mid-write: the engine's exit handler removes the
temp file. Stopped with SIGTERM (a service stop) it dies at once; the next conversion into the
folder removes what it left.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from quant_core.atomic import TEMP_SUFFIX
from quant_core.convert import ConvertOptions, convert_file

from .test_web import comfyui_server, convert_file_prompt


def queue(url: str, prompt: dict) -> None:
    request = urllib.request.Request(
        f"{url}/prompt", json.dumps({"prompt": prompt}).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def temp_files(base: Path) -> list[Path]:
    return sorted((base / "models").rglob("*" + TEMP_SUFFIX))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_stopping_the_server_mid_conversion(tiny_flux, tmp_path_factory, signum):
    with comfyui_server(tiny_flux[0], tmp_path_factory.mktemp("stopped")) as (url, base, process):
        queue(url, convert_file_prompt(filename_prefix="stopped/x", num_iter=2000, calib_samples=96))
        deadline = time.monotonic() + 120
        while not temp_files(base):
            assert process.poll() is None and time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.1)
        process.send_signal(signum)
        process.wait(timeout=60)
        assert not list((base / "models").rglob("x_*.safetensors"))  # nothing under a final name
        if signum == signal.SIGINT:
            assert temp_files(base) == []
        else:  # killed outright: the temp file stays until the next conversion into its folder
            (left,) = temp_files(base)
            convert_file(tiny_flux[0], left.parent / "next.safetensors", ConvertOptions(rounding="nearest"))
            assert temp_files(base) == []
