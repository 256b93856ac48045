"""quant_core: convert safetensors checkpoints to FP8-scaled weights (pure torch + safetensors).

The engine behind the ComfyUI nodes and ``python -m quant_core``. It never imports ComfyUI.
"""

__version__ = "0.1.0"
