"""The layer that consumes a layer's output, and the output-side metric it gives that layer's rounding.

GPTQ and its polish minimise ``tr(D H D^T)``: every output row of a layer counts alike and on its
own. What the model computes next does not: the layer that consumes this one's output multiplies
its error ``e`` by its own weight ``W_2``, so the error that travels on is ``||W_2 e||^2 = e^T G e``
with ``G = W_2^T W_2``, which couples the rows (an error along a direction ``W_2`` barely sees costs
little). Both weights are in the checkpoint, so this metric needs no more recording than GPTQ's
``H``. ``G`` is normalised to a mean diagonal of 1 and the identity is added: the activation between
the two layers (GELU) is put in per unit from the recorded statistics of both layers: the share
of its input's energy that reaches the consumer, ``sqrt(E[g_j^2] / E[z_j^2])`` (``passed``), for
``E[a'_j a'_k]`` which nothing records (without it the metric was worse than none); the paths
around the pair (residuals) are not in ``W_2^T W_2``, and the identity keeps the plain objective's
share. Only the MLP pair is ruled: a value projection's metric (``W_o^T W_o``) gained nothing and
the query/key pair's needs the head count (docs/calibration.md, third round).
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch

from .calibration import Gram, LowRankGram

IDENTITY = 1.0  # the identity's weight in G, in units of W_2^T W_2's mean diagonal
_CONSUMERS = (  # a layer's weight name -> the weight that consumes its output
    (re.compile(r"^(.*\.)?intermediate\.dense\.weight$"), r"\1output.dense.weight"),  # BERT MLP: up -> down
)


def consumer(name: str, names: Collection[str]) -> str | None:
    """The weight in ``names`` that consumes the output of the weight ``name``, if a rule names one."""
    for pattern, replacement in _CONSUMERS:
        if pattern.match(name):
            candidate = pattern.sub(replacement, name)
            return candidate if candidate in names else None
    return None


def passed(weight: torch.Tensor, inputs: Gram | LowRankGram, consumer_inputs: Gram | LowRankGram) -> torch.Tensor:
    """Per output unit ``j`` of ``weight``: ``sqrt(E[g_j^2] / E[z_j^2])``, ``z = W x`` the layer's
    output and ``g`` what the consumer receives (its recorded inputs), both on the same recorded rows
    (the fitting halves). Near 0 where the activation shuts the unit off, near 1 where it passes."""
    rows = weight.float()
    if isinstance(inputs, Gram):
        energy = ((rows @ inputs.matrix.to(rows)) * rows).sum(1)
    else:
        energy = (rows @ inputs.factor.to(rows)).square().sum(1) + (rows.square() * inputs.residual().to(rows)).sum(1)
    return (consumer_inputs.diagonal().to(rows) / energy.clamp_min(1e-30)).clamp_min(0).sqrt()


def output_metric(consumer_weight: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor | None:
    """``G = S W_2^T W_2 S / mean(diag) + IDENTITY * I`` (float32, ``out x out``), ``S = diag(scaling)``
    (``passed``), for a layer with ``len(scaling)`` outputs; None when the consumer's shape does not
    fit or nothing passes (then the plain objective stays)."""
    if consumer_weight.ndim != 2 or consumer_weight.shape[1] != scaling.numel():
        return None
    weight = consumer_weight.double() * scaling.double().to(consumer_weight.device)
    metric = weight.T @ weight
    mean = float(metric.diagonal().mean())
    if not 0 < mean < float("inf"):
        return None
    metric /= mean
    metric.diagonal().add_(IDENTITY)
    return metric.float()
