"""What rounding knows about the inputs a layer sees: random inputs, or statistics of real ones.

The seed script's learned rounding draws random Gaussian inputs (``RandomCalibration``, behind the
``CalibrationSource`` interface). Real information comes from running the model on real data with
a ``Recorder``, which keeps each Linear layer's input second moments ``X^T X`` (exact for narrow
layers, a low-rank sketch with an exact diagonal for wide ones) and writes them to a calibration
file; ``RecordedStatistics`` reads it back for the converter (``--calibration FILE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from .io import BufferPool, SafetensorsReader, write_file
from .job import Step, no_step


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
STATISTICS_VERSION = "2"


class Gram:
    """Exact second moments ``H = sum x x^T`` of a set of input rows."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix  # [in, in] float32

    def diagonal(self) -> torch.Tensor:
        return torch.diagonal(self.matrix)

    def quadratic(self, delta: torch.Tensor) -> float:
        """``tr(delta H delta^T)``: the summed squared output change of the weight change ``delta``."""
        delta = delta.double()
        return float(torch.einsum("oi,ij,oj->", delta, self.matrix.to(delta), delta))


class LowRankGram:
    """Sketched second moments ``H ~ F F^T + diag(residual)`` of a wide layer's inputs.

    ``F`` (``[in, r]``) holds the top of ``H``'s spectrum (a streaming Nystroem sketch), and the
    diagonal is exact: the residual puts back, per input channel, the energy the low rank missed,
    so channels with large activations are never under-weighted. ``r * in`` floats instead of ``in^2``.
    """

    def __init__(self, factor: torch.Tensor, diagonal: torch.Tensor):
        self.factor = factor  # [in, r] float32
        self.exact_diagonal = diagonal  # [in] float32
        self._residual: torch.Tensor | None = None

    def diagonal(self) -> torch.Tensor:
        return self.exact_diagonal

    def residual(self) -> torch.Tensor:
        """The diagonal part: exact diagonal minus what the factor explains (never negative). Made
        once (GPTQ and its polish both read it; each time was a pass over the factor and a
        temporary of its size); not to be changed in place."""
        if self._residual is None:
            self._residual = (self.exact_diagonal - self.factor.square().sum(1)).clamp_min(0)
        return self._residual

    def quadratic(self, delta: torch.Tensor) -> float:
        delta = delta.double()
        low_rank = float((delta @ self.factor.to(delta)).square().sum())
        return low_rank + float((delta.square() * self.residual().to(delta)).sum())


class RowSample:
    """A uniform random sample of input rows: an unbiased estimate of ``H`` up to a constant factor.

    Used for the held-out half of wide layers, where it judges a rounding without sharing the
    fitting sketch's blind spots.
    """

    def __init__(self, rows: torch.Tensor):
        self.rows = rows  # [m, in] float32 (bfloat16 for a product in bfloat16)

    def quadratic(self, delta: torch.Tensor) -> float:
        """``||delta rows^T||^2``, the product taken in the rows' dtype."""
        return float((delta.to(self.rows.dtype) @ self.rows.to(delta.device).T).double().square().sum())


Moments = Gram | LowRankGram | RowSample


@dataclass
class LayerStatistics:
    """One Linear layer's recorded inputs, split into a fitting and a held-out half (rows alternate),
    so a rounding fitted on one is judged on the other."""

    fit: Gram | LowRankGram
    heldout: Gram | RowSample
    count: int
    count_heldout: int
    input_absmax: float

    @property
    def in_features(self) -> int:
        return self.fit.diagonal().shape[0]


class _ExactRecording:
    """Exact ``X^T X`` of both halves: ``2 in^2`` floats, for narrow layers."""

    def __init__(self, in_features: int):
        self.gram = torch.zeros(in_features, in_features)
        self.gram_heldout = torch.zeros(in_features, in_features)

    def add(self, fit: torch.Tensor, held: torch.Tensor) -> None:
        self.gram += (fit.T @ fit).cpu()
        self.gram_heldout += (held.T @ held).cpu()

    @property
    def nbytes(self) -> int:
        return self.bytes_for(self.gram.shape[0])

    @staticmethod
    def bytes_for(in_features: int) -> int:
        return 2 * in_features * in_features * 4

    def finish(self) -> tuple[Gram, Gram]:
        return Gram(self.gram.clone()), Gram(self.gram_heldout.clone())


class _SketchedRecording:
    """A rank-``r`` Nystroem sketch ``Y = X^T X Omega`` plus the exact diagonal of the fitting half,
    and a uniform sample of ``r`` held-out rows: ``2 r in`` floats however many rows go by.

    Every update is two matrix products (cheap on the device the model runs on); the sketch is
    turned into a factor only once, at the end. The sample keeps the rows with the largest
    random keys (reservoir sampling that vectorises).
    """

    def __init__(self, in_features: int, rank: int, generator: torch.Generator):
        self.sketch = torch.zeros(in_features, rank)
        self.diagonal = torch.zeros(in_features, dtype=torch.float64)  # small; exact sums of squares
        self.sample = torch.zeros(0, in_features)
        self.keys = torch.zeros(0)
        self.generator = generator

    def add(self, fit: torch.Tensor, held: torch.Tensor, probe: torch.Tensor) -> None:
        self.sketch += (fit.T @ (fit @ probe)).cpu()
        self.diagonal += fit.square().sum(0).cpu().double()
        keys = torch.cat([self.keys, torch.rand(held.shape[0], generator=self.generator)])
        keep = torch.topk(keys, min(self.sketch.shape[1], keys.numel())).indices
        old, new = keep[keep < self.keys.numel()], keep[keep >= self.keys.numel()] - self.keys.numel()
        self.sample = torch.cat([self.sample[old], held[new.to(held.device)].cpu()])
        self.keys = torch.cat([self.keys[old], keys[self.keys.numel() :][new]])

    @property
    def nbytes(self) -> int:
        return self.diagonal.numel() * 8 + (self.sketch.numel() + self.sample.numel() + self.keys.numel()) * 4

    def finish(self, probe: torch.Tensor) -> tuple[LowRankGram, RowSample]:
        factor = _nystroem_factor(self.sketch.double(), probe.cpu().double())
        return LowRankGram(factor.float(), self.diagonal.float()), RowSample(self.sample.clone())


def _nystroem_factor(sketch: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """``F`` with ``F F^T ~ H`` from ``Y = H Omega`` (Tropp et al. 2017, the numerically stable form).

    A small shift (at the float32 precision the products were summed in) keeps the ``r x r`` core
    positive, and is taken off the spectrum again. The core is inverted through its eigenvalues,
    dropping the null ones, so a layer that saw fewer rows than the rank (``H`` of lower rank than
    the sketch) gets its exact low-rank ``H`` instead of a failed Cholesky.
    """
    shift = torch.finfo(torch.float32).eps * float(sketch.norm()) + 1e-300
    shifted = sketch + shift * probe
    core = probe.T @ shifted
    values, vectors = torch.linalg.eigh((core + core.T) / 2)
    keep = values > values.max() * 1e-12
    basis = shifted @ (vectors[:, keep] / values[keep].sqrt())  # Y Q L^-1/2: B B^T = Y core^+ Y^T
    left, singular, _ = torch.linalg.svd(basis, full_matrices=False)
    return left * (singular.square() - shift).clamp_min(0).sqrt()


@dataclass
class _Seen:
    """What went through one layer so far."""

    rows: int = 0
    fit: int = 0
    heldout: int = 0
    absmax: float = 0.0


def linear_like(module: torch.nn.Module) -> bool:
    """What is recorded (and converted) as a Linear layer: a 2-D weight that is no embedding table.

    ComfyUI's Linear ops are no ``torch.nn.Linear`` subclass, so the weight's shape decides.
    """
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.ndim == 2 and not isinstance(module, torch.nn.Embedding)


EXACT_BYTES = 1 << 30  # the Recorder's default memory for exact statistics


def exact_layers(widths: dict[str, int], limit: int, budget: int) -> set[str]:
    """The layers (name -> inputs) whose exact statistics fit in ``budget`` bytes, narrowest first,
    none wider than ``limit``: the most layers fitted on their exact ``H`` for the memory."""
    chosen, used = set(), 0
    for name, width in sorted(widths.items(), key=lambda item: item[1]):
        cost = _ExactRecording.bytes_for(width)
        if width > limit or used + cost > budget:
            break
        chosen.add(name)
        used += cost
    return chosen


class Recorder:
    """Records the input statistics of every Linear-like layer of a torch model with forward hooks.

    ``with Recorder(model) as rec: model(batch)`` (any number of calls), then ``rec.save(path)``.
    Statistics are keyed ``<prefix><module path>.weight``, the weight's state-dict name. Layers
    keep their exact ``in x in`` second moments (``2 in^2`` floats) narrowest first, as long as
    those of all of them fit in ``exact_bytes`` and the layer has at most ``exact_limit`` inputs;
    the others a rank-``rank`` sketch (``2 * rank * in`` floats, see ``_SketchedRecording``), so
    memory is bounded by the model's shapes, not by how much data goes through: ``nbytes``
    reports it. Exact statistics fit better (docs/calibration.md). Accumulators live in CPU
    memory; the model's device only does the per-call matrix products.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        rank: int = 128,
        exact_limit: int = 4096,
        prefix: str = "",
        exact_bytes: int = EXACT_BYTES,
    ):
        if rank < 1:
            raise ValueError(f"the sketch rank must be positive, not {rank}")
        self.model = model
        self.prefix = prefix
        self.rank = rank
        self.exact_limit = max(exact_limit, rank)  # a sketch is only smaller when rank < in
        self._exact: set[str] = set()
        self._recordings: dict[str, _ExactRecording | _SketchedRecording] = {}
        self._seen: dict[str, _Seen] = {}
        self._probes: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(0)
        self._handles: list = []
        widths: dict[str, int] = {}
        for path, module in model.named_modules():
            if not linear_like(module):
                continue
            name = f"{prefix}{path}.weight" if path else f"{prefix}weight"  # the model itself may be a Linear
            self._handles.append(module.register_forward_hook(self._hook(name, module.weight.shape[1])))
            widths[name] = module.weight.shape[1]
        self._exact = exact_layers(widths, self.exact_limit, exact_bytes)

    def _hook(self, name: str, in_features: int):
        def record(module, inputs, output) -> None:
            if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].shape[-1] != in_features:
                return  # not used as a Linear on this call
            with torch.no_grad():
                self._add(name, inputs[0].detach().reshape(-1, in_features).float())

        return record

    def _probe(self, in_features: int, device: torch.device) -> torch.Tensor:
        """The sketch's Gaussian test matrix, one per width: the same on every device and every run."""
        if (in_features, device) not in self._probes:
            generator = torch.Generator().manual_seed(in_features)
            probe = torch.randn(in_features, self.rank, generator=generator, dtype=torch.float64)
            self._probes[(in_features, device)] = probe.to(device=device, dtype=torch.float32)
        return self._probes[(in_features, device)]

    def _add(self, name: str, rows: torch.Tensor) -> None:
        in_features = rows.shape[1]
        if name not in self._recordings:
            sketched = name not in self._exact
            self._recordings[name] = (
                _SketchedRecording(in_features, self.rank, self._generator)
                if sketched
                else _ExactRecording(in_features)
            )
            self._seen[name] = _Seen()
        seen = self._seen[name]
        first = seen.rows % 2  # rows alternate between the two halves across calls
        fit, held = rows[first::2], rows[1 - first :: 2]
        recording = self._recordings[name]
        if isinstance(recording, _SketchedRecording):
            recording.add(fit, held, self._probe(in_features, rows.device))
        else:
            recording.add(fit, held)
        seen.rows += rows.shape[0]
        seen.fit += fit.shape[0]
        seen.heldout += held.shape[0]
        seen.absmax = max(seen.absmax, float(rows.abs().max()) if rows.numel() else 0.0)

    @property
    def names(self) -> list[str]:
        """The weights recorded so far."""
        return list(self._recordings)

    @property
    def nbytes(self) -> int:
        """Memory held by the recording (accumulators and the sketches' test matrices)."""
        probes = sum(p.numel() * p.element_size() for p in self._probes.values())
        return probes + sum(r.nbytes for r in self._recordings.values())

    def statistics(self, step: Step = no_step) -> dict[str, LayerStatistics]:
        """The recorded statistics so far, per weight (sketches are turned into factors here);
        ``step(done, total)`` counts the layers and may raise to stop."""
        result = {}
        for done, (name, recording) in enumerate(self._recordings.items()):
            step(done, len(self._recordings))
            if isinstance(recording, _SketchedRecording):
                fit, heldout = recording.finish(self._probe(recording.sketch.shape[0], torch.device("cpu")))
            else:
                fit, heldout = recording.finish()
            seen = self._seen[name]
            result[name] = LayerStatistics(fit, heldout, seen.fit, seen.heldout, seen.absmax)
        return result

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self, path: str | os.PathLike, step: Step = no_step) -> None:
        """Write the statistics as safetensors, atomically (see ``save_statistics``)."""
        save_statistics(path, self.statistics(step))


STATISTICS_METADATA = {"format": STATISTICS_FORMAT, "version": STATISTICS_VERSION}


def statistics_tensors(name: str, stats: LayerStatistics) -> dict[str, torch.Tensor]:
    """One weight's tensors in a calibration file: ``.gram`` + ``.gram_heldout`` (exact) or
    ``.factor`` + ``.diagonal`` + ``.heldout_rows`` (sketched), and ``.count`` (fitting, held-out
    rows) and ``.input_absmax``."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(stats.fit, Gram):
        tensors[f"{name}.gram"] = stats.fit.matrix
    else:
        tensors[f"{name}.factor"] = stats.fit.factor
        tensors[f"{name}.diagonal"] = stats.fit.exact_diagonal
    if isinstance(stats.heldout, Gram):
        tensors[f"{name}.gram_heldout"] = stats.heldout.matrix
    else:
        tensors[f"{name}.heldout_rows"] = stats.heldout.rows
    tensors[f"{name}.count"] = torch.tensor([stats.count, stats.count_heldout], dtype=torch.int64)
    tensors[f"{name}.input_absmax"] = torch.tensor(stats.input_absmax, dtype=torch.float32)
    return tensors


def save_statistics(path: str | os.PathLike, statistics: dict[str, LayerStatistics]) -> None:
    """Write per-weight statistics (``statistics_tensors``) as a calibration file, atomically."""
    tensors = {key: t for name, stats in statistics.items() for key, t in statistics_tensors(name, stats).items()}
    write_file(path, tensors, STATISTICS_METADATA)


class RecordedStatistics:
    """A calibration file written by ``Recorder.save``, read one layer at a time.

    ``prefix`` is the source checkpoint's key prefix (``model.diffusion_model.`` for a full
    checkpoint): statistics recorded on the bare diffusion model then match its weights too.
    """

    def __init__(self, path: str | os.PathLike, prefix: str = ""):
        self._reader = SafetensorsReader(path)
        metadata = self._reader.metadata
        if metadata.get("format") != STATISTICS_FORMAT:
            self._reader.close()
            raise ValueError(f"{path} is not a calibration file written by quant_core.calibration.Recorder")
        if metadata.get("version") != STATISTICS_VERSION:
            self._reader.close()
            raise ValueError(
                f"{path} is a calibration file of version {metadata.get('version')}; this converter reads "
                f"version {STATISTICS_VERSION}: record it again"
            )
        self.names = {k.removesuffix(".count") for k in self._reader.tensors if k.endswith(".count")}
        self.prefix = prefix

    def key(self, name: str) -> str | None:
        """The recorded name of the weight ``name`` (itself, or without the prefix); None if not recorded."""
        if name in self.names:
            return name
        bare = name.removeprefix(self.prefix) if self.prefix else name
        return bare if bare in self.names else None

    def input_absmax(self, name: str) -> float:
        """The recorded inputs' absolute maximum (read alone: the statistics are not loaded)."""
        return float(self._reader.read(f"{self.key(name)}.input_absmax"))

    def get(self, name: str, in_features: int | None = None, pool: BufferPool | None = None) -> LayerStatistics | None:
        """Statistics for the weight ``name``, or None when it was not recorded; a ``ValueError``
        when they were recorded for another number of inputs than the weight's ``in_features``.
        ``pool``: memory for them (a conversion's ``io.BufferPool``): each layer's are several MB,
        fresh pages the kernel would otherwise fault in and zero for every weight."""
        key = self.key(name)
        if key is None:
            return None
        stats = self._read(key, pool)
        if in_features is not None and stats.in_features != in_features:
            raise ValueError(
                f"{name}: the calibration file has statistics for {stats.in_features} inputs, "
                f"the weight has {in_features}; was it recorded on another model?"
            )
        return stats

    def _read(self, name: str, pool: BufferPool | None = None) -> LayerStatistics:
        """One weight's statistics, each tensor in memory of its own (from ``pool`` where given)."""
        stored = self._reader.tensors

        def read(key: str) -> torch.Tensor:
            return self._reader.read(key, pool=pool)

        count, count_heldout = (int(n) for n in read(f"{name}.count"))
        if f"{name}.gram" in stored:
            fit = Gram(read(f"{name}.gram"))
        else:
            fit = LowRankGram(read(f"{name}.factor"), read(f"{name}.diagonal"))
        if f"{name}.gram_heldout" in stored:
            heldout = Gram(read(f"{name}.gram_heldout"))
        else:
            heldout = RowSample(read(f"{name}.heldout_rows"))
        return LayerStatistics(fit, heldout, count, count_heldout, float(read(f"{name}.input_absmax")))

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> RecordedStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
