"""ComfyUI nodes of the pack: thin wrappers over ``quant_core``.

``schema`` holds the node classes and needs ComfyUI's ``comfy_api``; everything else here
(``conversion``, ``loading``, ``model_source``, ``options``, ``host``) imports without ComfyUI.
"""
