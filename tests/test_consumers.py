"""The output-side metric from the layer that consumes a layer's output (quant_core.consumers), and
GPTQ's polish on it (gptq._polish_coupled)."""

from __future__ import annotations

import torch

from bench.comfy_fp8 import output_error
from quant_core import consumers, fp8, gptq, io
from quant_core.calibration import Gram, LayerStatistics, LowRankGram, Recorder, save_statistics
from quant_core.convert import ConvertOptions, Rounder, convert_file, plan_conversion
from quant_core.io import SafetensorsReader

E4M3 = torch.float8_e4m3fn


def inputs(count: int, seed: int, width: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(6, width, generator=torch.Generator().manual_seed(99))
    return torch.randn(count, 6, generator=generator) @ mixing + 0.1 * torch.randn(count, width, generator=generator)


def test_consumer_rules_name_the_next_weight_only_when_the_file_has_it():
    names = {"encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight"}
    assert consumers.consumer("encoder.layer.0.intermediate.dense.weight", names) == (
        "encoder.layer.0.output.dense.weight"
    )
    assert consumers.consumer("encoder.layer.1.intermediate.dense.weight", names) is None  # not in the file
    assert consumers.consumer("encoder.layer.0.output.dense.weight", names) is None  # no rule


def test_output_metric_is_the_consumers_scaled_gram_normalised_plus_the_identity():
    consumer = torch.randn(8, 20, generator=torch.Generator().manual_seed(1))
    scaling = torch.rand(20, generator=torch.Generator().manual_seed(2))
    metric = consumers.output_metric(consumer, scaling)
    gram = scaling.double()[:, None] * (consumer.double().T @ consumer.double()) * scaling.double()[None, :]
    expected = gram / gram.diagonal().mean() + consumers.IDENTITY * torch.eye(20, dtype=torch.float64)
    assert metric.dtype == torch.float32 and torch.allclose(metric.double(), expected, atol=1e-5)
    assert consumers.output_metric(consumer, torch.ones(8)) is None, "shapes that do not chain"
    assert consumers.output_metric(consumer, torch.zeros(20)) is None, "nothing passes"


def test_passed_is_the_share_of_each_units_energy_that_reaches_the_consumer():
    """Through a ReLU: ``sqrt(sum g^2 / sum z^2)`` per unit, from the two layers' second moments alone,
    exact or sketched (a full-rank factor)."""
    x = inputs(500, 3, width=16)
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    z = x @ weight.T
    g = torch.relu(z)
    exact = consumers.passed(weight, Gram(x.T @ x), Gram(g.T @ g))
    assert torch.allclose(exact, (g.square().sum(0) / z.square().sum(0)).sqrt(), rtol=1e-3)
    assert bool(((exact > 0.1) & (exact < 1)).all())  # a ReLU passes part of each unit's energy
    factor = torch.linalg.cholesky((x.T @ x).double()).float()
    sketched = consumers.passed(weight, LowRankGram(factor, (x.T @ x).diagonal()), Gram(g.T @ g))
    assert torch.allclose(sketched, exact, rtol=1e-3)


def coupled_objective(codes: torch.Tensor, scaled: torch.Tensor, gram: torch.Tensor, metric: torch.Tensor) -> float:
    error = codes.float().double() - scaled.double()
    return float(torch.einsum("io,ij,jp,op->", error, gram.double(), error, metric.double()))


def test_coupled_polish_with_the_identity_is_the_plain_polish():
    generator = torch.Generator().manual_seed(2)
    x = inputs(300, 3)
    scaled = 30 * torch.randn(48, 24, generator=generator)  # one row per weight column
    codes = (scaled + 2 * torch.randn(48, 24, generator=generator)).to(E4M3)
    plain, coupled = codes.clone(), codes.clone()
    gptq._polish(gptq._errors(plain, scaled.clone()), plain, Gram(x.T @ x), passes=1)
    gptq._polish_coupled(scaled.clone(), coupled, Gram(x.T @ x), torch.eye(24), passes=1)
    assert float((plain.view(torch.uint8) == coupled.view(torch.uint8)).float().mean()) > 0.99


def test_coupled_polish_lowers_its_objective_in_steps_to_grid_neighbours():
    generator = torch.Generator().manual_seed(4)
    x = inputs(300, 5)
    gram = x.T @ x
    consumer = torch.randn(6, 24, generator=generator)
    metric = consumers.output_metric(consumer, torch.ones(24))
    scaled = 30 * torch.randn(48, 24, generator=generator)
    codes = scaled.to(E4M3)
    polished = codes.clone()
    gptq._polish_coupled(scaled.clone(), polished, Gram(gram), metric, passes=1)
    before, after = (coupled_objective(c, scaled, gram, metric) for c in (codes, polished))
    assert after < 0.9 * before
    moved = polished.float() != codes.float()
    assert moved.any()
    # one pass moves a weight at most once, to a grid neighbour
    values = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = torch.unique(values[torch.isfinite(values)])
    rank = lambda t: torch.searchsorted(grid, t.float().contiguous())  # noqa: E731
    assert int((rank(polished) - rank(codes)).abs().max()) == 1


def test_the_metric_lowers_the_error_after_the_consumer_on_fresh_inputs():
    """A linear consumer that sees few directions of the layer's output: rounding the layer with its
    metric leaves less error in the consumer's output on inputs it never saw."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 48, generator=generator)
    consumer = torch.randn(8, 64, generator=generator)
    fit, fresh = inputs(2000, 8), inputs(2000, 9)
    stats = LayerStatistics(Gram(fit[0::2].T @ fit[0::2]), Gram(fit[1::2].T @ fit[1::2]), 1000, 1000, 1.0)
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    plain = gptq.round_gptq(weight, scale, E4M3, stats)
    coupled = gptq.round_gptq(weight, scale, E4M3, stats, metric=consumers.output_metric(consumer, torch.ones(64)))
    assert not plain.fell_back and not coupled.fell_back
    downstream = lambda r: float((fresh @ (r.quantized.float() * scale - weight).T @ consumer.T).norm())  # noqa: E731
    assert downstream(coupled) < 0.9 * downstream(plain)
    assert output_error(weight, coupled.quantized.float() * scale, Gram(fresh.T @ fresh)) < coupled.error_rtn


class Block(torch.nn.Module):
    """BERT's names for an MLP: ``intermediate.dense`` feeds ``output.dense``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.intermediate, self.output = torch.nn.Module(), torch.nn.Module()
        self.intermediate.dense, self.output.dense = torch.nn.Linear(48, 64), torch.nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(torch.nn.functional.gelu(self.intermediate.dense(x)))


def test_conversion_reads_the_consumer_and_polishes_on_its_metric(tmp_path):
    block = Block()
    io.write_file(tmp_path / "m.safetensors", {k: v.detach().contiguous() for k, v in block.state_dict().items()})
    with Recorder(block) as recorder, torch.no_grad():
        block(inputs(800, 1))
    save_statistics(tmp_path / "c.safetensors", recorder.statistics())
    options = ConvertOptions(preset="none", min_tensor_size=0, calibration=str(tmp_path / "c.safetensors"))
    with SafetensorsReader(tmp_path / "m.safetensors") as reader, plan_conversion(reader, options) as plan:
        rounder = Rounder(plan, None, None, reader)
        weight, stats = block.intermediate.dense.weight.detach(), plan.statistics.get("intermediate.dense.weight")
        scaling = consumers.passed(weight, stats.fit, plan.statistics.get("output.dense.weight").fit)
        assert float(scaling.min()) > 0.05 and float(scaling.max()) < 1.5  # GELU passes some of each unit
        metric = rounder.output_metric("intermediate.dense.weight", weight, stats)
        assert torch.allclose(metric, consumers.output_metric(block.output.dense.weight.detach(), scaling))
        other = block.output.dense.weight.detach()
        assert rounder.output_metric("output.dense.weight", other, plan.statistics.get("output.dense.weight")) is None
    summary = convert_file(tmp_path / "m.safetensors", tmp_path / "o.safetensors", options)
    assert summary.methods == {"gptq": 2}
