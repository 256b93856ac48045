"""Where calibration inputs for learned rounding come from.

Learned rounding needs example inputs ``X`` of each Linear layer to measure the layer-output
error ``||X (W_q - W)^T||``. A calibration source hands them out per weight name. The seed
script's source is random Gaussian inputs (``RandomCalibration``); sources built on recorded
activations plug in through the same ``CalibrationSource`` interface.
"""

from __future__ import annotations

from typing import Protocol

import torch


class CalibrationSource(Protocol):
    """Gives ``count`` example input rows of width ``in_features`` for the weight ``name``."""

    def inputs(
        self, name: str, in_features: int, count: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """A float32 ``[count, in_features]`` tensor on ``device``, drawn using ``generator``."""
        ...


class RandomCalibration:
    """Standard-normal inputs, as in the seed script.

    With isotropic inputs the expected output error is minimised by round-to-nearest, so
    learned rounding against this source mostly fits sampling noise; the held-out check in
    ``rounding.round_learned`` then keeps round-to-nearest.
    """

    def inputs(
        self, name: str, in_features: int, count: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        return torch.randn(count, in_features, generator=generator, device=generator.device).to(device)
