"""The pack imports without ComfyUI, the way ComfyUI imports it, and registers nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter in isolated mode (-I: no PYTHONPATH, no user site, no script folder on
# sys.path) from a folder outside the repository, so neither the repository nor ComfyUI is
# importable by accident. ComfyUI's module names are blocked as well, in case they are installed.
SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, importlib.util, json, sys
    root = sys.argv[1]
    BLOCKED = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution")
    attempted = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempted.append(name)
                raise ImportError(f"blocked {name}")
            return None

    sys.meta_path.insert(0, Block())
    name = "ComfyUI-FP8-Scaled-Learned"  # the folder name under custom_nodes/: not an identifier
    spec = importlib.util.spec_from_file_location(name, root + "/__init__.py", submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for sub in ("host", "options", "model_source", "conversion", "loading", "recording"):
        importlib.import_module(f"{name}.nodes.{sub}")
    try:
        importlib.import_module(f"{name}.nodes.schema")
        schema = "imported"
    except ImportError as exc:
        schema = str(exc)
    print(json.dumps({
        "entrypoint": repr(module.comfy_entrypoint),
        "web": module.WEB_DIRECTORY,
        "all": sorted(module.__all__),
        "attempted": sorted(set(attempted)),
        "schema": schema,
        "top_level": sorted(k for k in sys.modules if k.split(".")[0] in ("nodes", "quant_core", *BLOCKED)),
    }))
    """
)


def test_root_package_imports_cleanly_without_comfyui(tmp_path):
    done = subprocess.run(
        [sys.executable, "-I", "-c", SCRIPT, str(ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["entrypoint"] == "None"
    assert result["web"] == "./web" and (ROOT / "web").is_dir()
    assert result["all"] == ["WEB_DIRECTORY", "comfy_entrypoint"]
    # Only the schema API is probed at import time; the runtime modules are imported lazily.
    assert result["attempted"] == ["comfy_api"]
    assert "comfy_api" in result["schema"]
    # Everything came in through relative imports under the pack's own name.
    assert result["top_level"] == []
