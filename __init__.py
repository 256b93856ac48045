"""ComfyUI entry point of the FP8 Scaled Learned node pack.

ComfyUI imports this package from ``custom_nodes/``. The conversion engine lives in
``quant_core`` (no ComfyUI imports) and is also usable from a shell: ``python -m quant_core``.
This module must import cleanly with or without ComfyUI present.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
