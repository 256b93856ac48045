"""What rounding knows about the inputs a layer sees: random inputs, or statistics of real ones.

The seed script's learned rounding draws random Gaussian inputs (``RandomCalibration``, behind the
``CalibrationSource`` interface). Real information comes from running the model on real data with
a ``Recorder``, which sums each Linear layer's input second moments ``X^T X`` into a calibration
file; ``RecordedStatistics`` reads it back for the converter (``--calibration FILE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


STATISTICS_FORMAT = "quant_core.calibration"


@dataclass
class LayerStatistics:
    """Second moments of one Linear layer's real inputs, split into a fitting and a held-out half.

    ``gram`` is ``sum x x^T`` over the fitting half of the recorded input rows, ``gram_heldout``
    over the other half (rows alternate), so a rounding fitted on one is judged on the other.
    """

    gram: torch.Tensor  # [in, in] float32
    gram_heldout: torch.Tensor  # [in, in] float32
    count: int
    count_heldout: int
    input_absmax: float

    @property
    def in_features(self) -> int:
        return self.gram.shape[0]


class Recorder:
    """Records the input statistics of every Linear-like layer of a torch model with forward hooks.

    ``with Recorder(model) as rec: model(batch)`` (any number of calls), then ``rec.save(path)``.
    Statistics are keyed ``<module path>.weight``, the weight's state-dict name. Layers wider than
    ``max_features`` inputs are skipped (their ``in x in`` matrices would cost too much memory);
    ``skipped`` lists them and ``nbytes`` reports the memory held.
    """

    def __init__(self, model: torch.nn.Module, max_features: int = 8192, prefix: str = ""):
        self.model = model
        self.prefix = prefix
        self.stats: dict[str, LayerStatistics] = {}
        self.skipped: list[str] = []
        self._rows: dict[str, int] = {}
        self._handles: list = []
        for path, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or isinstance(module, torch.nn.Embedding):
                continue
            name = f"{prefix}{path}.weight"
            if weight.shape[1] > max_features:
                self.skipped.append(name)
                continue
            self._handles.append(module.register_forward_hook(self._hook(name, weight.shape[1])))

    def _hook(self, name: str, in_features: int):
        def record(module, inputs, output) -> None:
            if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].shape[-1] != in_features:
                return  # not used as a Linear on this call
            self._add(name, inputs[0].detach().reshape(-1, in_features))

        return record

    def _add(self, name: str, rows: torch.Tensor) -> None:
        rows = rows.float()
        if name not in self.stats:
            zeros = torch.zeros(rows.shape[1], rows.shape[1])
            self.stats[name] = LayerStatistics(zeros, zeros.clone(), 0, 0, 0.0)
            self._rows[name] = 0
        stats = self.stats[name]
        first = self._rows[name] % 2  # rows alternate between the two halves across calls
        fit, held = rows[first::2], rows[1 - first :: 2]
        stats.gram += (fit.T @ fit).cpu()
        stats.gram_heldout += (held.T @ held).cpu()
        stats.count += fit.shape[0]
        stats.count_heldout += held.shape[0]
        stats.input_absmax = max(stats.input_absmax, float(rows.abs().max()) if rows.numel() else 0.0)
        self._rows[name] += rows.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(2 * s.gram.numel() * s.gram.element_size() for s in self.stats.values())

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics as safetensors: ``<weight>.gram``, ``.gram_heldout``, ``.count``, ``.input_absmax``."""
        from .io import write_file

        tensors: dict[str, torch.Tensor] = {}
        for name, stats in self.stats.items():
            tensors[f"{name}.gram"] = stats.gram
            tensors[f"{name}.gram_heldout"] = stats.gram_heldout
            tensors[f"{name}.count"] = torch.tensor([stats.count, stats.count_heldout], dtype=torch.int64)
            tensors[f"{name}.input_absmax"] = torch.tensor(stats.input_absmax, dtype=torch.float32)
        write_file(path, tensors, {"format": STATISTICS_FORMAT, "version": "1"})


class RecordedStatistics:
    """A calibration file written by ``Recorder.save``, read one layer at a time."""

    def __init__(self, path: str | os.PathLike):
        from .io import SafetensorsReader

        self._reader = SafetensorsReader(path)
        if self._reader.metadata.get("format") != STATISTICS_FORMAT:
            self._reader.close()
            raise ValueError(f"{path} is not a calibration file written by quant_core.calibration.Recorder")
        self.names = {k.removesuffix(".gram") for k in self._reader.tensors if k.endswith(".gram")}

    def get(self, name: str) -> LayerStatistics | None:
        """Statistics for the weight ``name``, or None when it was not recorded."""
        if name not in self.names:
            return None
        read = self._reader.read
        count, count_heldout = (int(n) for n in read(f"{name}.count"))
        return LayerStatistics(
            read(f"{name}.gram").clone(),
            read(f"{name}.gram_heldout").clone(),
            count,
            count_heldout,
            float(read(f"{name}.input_absmax")),
        )

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> RecordedStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
