"""ComfyUI entry point of the FP8 Scaled Learned node pack.

ComfyUI imports this package from ``custom_nodes/`` and calls ``comfy_entrypoint`` (schema API).
Outside ComfyUI (tests, the command line) it imports cleanly and registers nothing. The engine,
``quant_core``, never imports ComfyUI and also runs from a shell: ``python -m quant_core``.
"""

import logging

WEB_DIRECTORY = "./web"

try:
    from comfy_api.v0_0_2 import ComfyExtension  # noqa: F401 - only present inside ComfyUI
except ImportError:
    comfy_entrypoint = None
else:
    try:
        from .nodes.schema import comfy_entrypoint
    except ImportError as exc:  # e.g. a ComfyUI too old for the pinned schema API
        logging.getLogger(__name__).error("FP8 Scaled nodes are unavailable: %s", exc)
        comfy_entrypoint = None

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
