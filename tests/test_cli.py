"""The command line, run in-process through ``quant_core.cli.main``: option spellings, the seed's own
command line, the inspect / verify / decode subcommands, and errors reported without a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quant_core import codec
from quant_core.cli import convert_parser, main, options_from
from quant_core.convert import ConvertOptions, default_output_path
from quant_core.inspection import verify_files
from quant_core.io import SafetensorsReader, write_file
from quant_core.options import LearnedOptions

ROOT = Path(__file__).resolve().parents[1]
LAYER = "double_blocks.0.img_attn.qkv"  # quantized by the flux preset
KEPT = "double_blocks.0.img_attn.qkv.bias"  # passes through
QUICK = ["--quiet", "--simple"]

# ---------------------------------------------------------------------------------------------- helpers


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` as the interpreter would run it: exit status, stdout, stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors and --help
        code = exc.code
        if isinstance(code, str):  # SystemExit("message") prints the message and exits 1
            print(code, file=sys.stderr)
            code = 1
        code = code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse(argv: list[str]) -> ConvertOptions:
    return options_from(convert_parser().parse_args(["--input", "model.safetensors", *argv]))


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsReader(path) as reader:
        return {name: reader.read(name) for name in reader.tensors}, dict(reader.metadata)


def rewrite(path: Path, mutate) -> None:
    """Read every tensor, let ``mutate`` change the dict, write the file again (as a corrupt tool would)."""
    tensors, metadata = read_all(path)
    mutate(tensors)
    write_file(path, tensors, metadata)


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def convert(source: Path, tmp_path: Path, capsys, *extra: str, name: str = "out.safetensors") -> Path:
    output = tmp_path / name
    code, _, err = run(["--input", source, "--output", output, *QUICK, *extra], capsys)
    assert code == 0, err
    return output


# ---------------------------------------------------------------------------------------------- option parsing

# (underscore spelling, dashed spelling, what it sets, the value it must get)
BOTH_SPELLINGS = [
    (["--use_amp"], ["--use-amp"], lambda o: o.learned.use_amp, True),
    (["--no-use_amp"], ["--no-use-amp"], lambda o: o.learned.use_amp, False),
    (["--use_shared_scales"], ["--use-shared-scales"], lambda o: o.shared_scales, True),
    (["--no-use_shared_scales"], ["--no-use-shared-scales"], lambda o: o.shared_scales, False),
    (["--calib_samples", "7"], ["--calib-samples", "7"], lambda o: o.learned.calib_samples, 7),
    (["--num_iter", "11"], ["--num-iter", "11"], lambda o: o.learned.num_iter, 11),
    (["--reg_lambda", "0.25"], ["--reg-lambda", "0.25"], lambda o: o.learned.reg_lambda, 0.25),
    (
        ["--early_stop_threshold", "0.001"],
        ["--early-stop-threshold", "0.001"],
        lambda o: o.learned.early_stop_threshold,
        0.001,
    ),
    (["--batch_size", "4"], ["--batch-size", "4"], lambda o: o.learned.batch_size, 4),
    (["--min_tensor_size", "17"], ["--min-tensor-size", "17"], lambda o: o.min_tensor_size, 17),
    (["--keep_distillation"], ["--keep-distillation"], lambda o: o.keep_distillation, True),
    (["--fp8_format", "float8_e5m2"], ["--fp8-format", "float8_e5m2"], lambda o: o.fp8_format, "float8_e5m2"),
]
ONE_SPELLING = [
    (["--lr", "0.5"], lambda o: o.learned.lr, 0.5),
    (["--t5xxl"], lambda o: o.t5xxl, True),
    (["--text_encoders"], lambda o: o.text_encoders, True),
    (["--parallel"], lambda o: o.parallel, True),
    (["--simple"], lambda o: o.rounding, "nearest"),
    (["--rounding", "learned"], lambda o: o.rounding, "learned"),
    (["--seed", "5"], lambda o: o.learned.seed, 5),
    (["--format", "ultra8"], lambda o: o.format, "ultra8"),
    (["--preset", "t5"], lambda o: o.preset, "t5"),
    (["--exclude", "a", "--exclude", "b"], lambda o: o.exclude, ["a", "b"]),
    (["--include", "x"], lambda o: o.include, ["x"]),
    (["--overwrite"], lambda o: o.overwrite, True),
    (["--device", "cpu"], lambda o: o.device, "cpu"),
]


@pytest.mark.parametrize(("underscore", "dashed", "get", "value"), BOTH_SPELLINGS, ids=lambda v: None)
def test_both_spellings_give_the_same_options(underscore, dashed, get, value):
    options = parse(underscore)
    assert options == parse(dashed)
    assert get(options) == value


@pytest.mark.parametrize(("argv", "get", "value"), ONE_SPELLING, ids=lambda v: None)
def test_single_spelling_options(argv, get, value):
    assert get(parse(argv)) == value


def test_defaults_are_the_seed_scripts():
    options = parse([])
    assert options == ConvertOptions()
    assert options.learned == LearnedOptions(
        num_iter=200,
        lr=3e-2,
        reg_lambda=0.015,
        calib_samples=96,
        batch_size=None,
        early_stop_threshold=5e-6,
        use_amp=True,
        seed=0,
    )
    assert options.shared_scales is True
    assert options.min_tensor_size == 1024
    assert (options.t5xxl, options.keep_distillation, options.parallel) == (False,) * 3
    assert options.rounding == "auto"
    assert options.format == "comfy" and options.fp8_format == "float8_e4m3fn"


def test_input_and_output_options():
    args = convert_parser().parse_args(["--input", "in.safetensors", "--output", "out.safetensors"])
    assert (args.input, args.output) == ("in.safetensors", "out.safetensors")
    assert convert_parser().parse_args(["--input", "in.safetensors"]).output is None


def test_seed_command_line_parses_to_the_same_options_either_way():
    seed = parse(["--use-amp", "--parallel", "--use_shared_scales"])
    assert seed == parse(["--use_amp", "--parallel", "--use-shared-scales"])
    assert seed.parallel and seed.shared_scales and seed.learned.use_amp


# ---------------------------------------------------------------------------------------------- convert


def test_seed_command_line_converts(small_file, tmp_path, capsys):
    output = tmp_path / "seed_out.safetensors"
    argv = ["--input", small_file, "--output", output, "--use-amp", "--parallel", "--use_shared_scales"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "2 quantized" in out
    report = verify_files(str(small_file), str(output))
    assert report.violations == []
    assert len(report.layers) == 2
    described = json.loads(read_all(output)[1]["quant_core"])
    assert described["settings"]["rounding"] == "auto"
    assert "parallel" not in described["settings"], "how a file was made must not change its bytes"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--format", "ultra8"], "flux_tiny_float8_e4m3fn_scaled_ultra_8bit_shared.safetensors"),
        (["--format", "ultra8", "--no-use-shared-scales"], "flux_tiny_float8_e4m3fn_scaled_ultra_8bit.safetensors"),
        (
            ["--format", "ultra8", "--keep_distillation"],
            "flux_tiny_float8_e4m3fn_scaled_ultra_nodistill_8bit_shared.safetensors",
        ),
        ([], "flux_tiny_float8_e4m3fn_scaled.safetensors"),
    ],
)
def test_output_name_defaults_next_to_the_input(flux_file, capsys, extra, expected):
    code, _, err = run(["--input", flux_file, *QUICK, *extra], capsys)
    assert code == 0, err
    output = flux_file.with_name(expected)
    assert output.exists()
    assert output == default_output_path(flux_file, parse([*QUICK, *extra]))
    assert load_file(str(output))[f"{LAYER}.weight"].dtype == torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("fmt", ["comfy", "legacy", "ultra8"])
def test_inspect_prints_the_format(flux_file, tmp_path, capsys, fmt):
    output = convert(flux_file, tmp_path, capsys, "--format", fmt)
    code, out, _ = run(["inspect", output], capsys)
    assert code == 0
    assert re.search(rf"^format\s+{fmt}$", out, re.MULTILINE), out
    code, out, _ = run(["inspect", "--layers", output], capsys)
    assert code == 0 and f"{LAYER}.weight" in out


def test_inspect_an_unconverted_file(flux_file, capsys):
    code, out, _ = run(["inspect", flux_file], capsys)
    assert code == 0
    assert re.search(r"^format\s+none$", out, re.MULTILINE), out


def test_the_error_column_is_shown_only_when_measured_against_the_original(checkpoint_file, tmp_path, capsys):
    output = convert(checkpoint_file, tmp_path, capsys)
    _, inspected, _ = run(["inspect", "--layers", output], capsys)
    rows = re.findall(r"^\S+\.weight\s+\d+x\d+\s.*$", inspected, re.MULTILINE)
    assert rows and "rel.err" not in inspected  # no original, no error to show
    assert not [row for row in rows if "%" in row], inspected
    _, verified, _ = run(["verify", checkpoint_file, output], capsys)
    assert "rel.err" in verified
    errors = [float(m) for m in re.findall(r"\s(\d+\.\d+)%", verified)]
    assert errors and all(0 < e < 10 for e in errors), verified


# ---------------------------------------------------------------------------------------------- verify


@pytest.mark.parametrize("fmt", ["comfy", "legacy", "ultra8"])
def test_verify_accepts_a_good_conversion(checkpoint_file, tmp_path, capsys, fmt):
    output = convert(checkpoint_file, tmp_path, capsys, "--format", fmt)
    code, out, _ = run(["verify", checkpoint_file, output], capsys)
    assert code == 0, out
    assert "VIOLATION" not in out


SCALE = f"{LAYER}.weight_scale"
# name -> (how the converted file is damaged, the tensor the violation must name)
CORRUPTIONS = {
    "per_row_scale_out_by_1": (
        lambda t: t.update({SCALE: t[SCALE].expand(t[f"{LAYER}.weight"].shape[0], 1).clone()}),
        SCALE,
    ),
    "per_row_scale_out": (lambda t: t.update({SCALE: t[SCALE].expand(t[f"{LAYER}.weight"].shape[0]).clone()}), SCALE),
    "float16_scale": (lambda t: t.update({SCALE: t[SCALE].half()}), SCALE),
    "negative_scale": (lambda t: t.update({SCALE: -t[SCALE]}), SCALE),
    "changed_pass_through": (lambda t: t.update({KEPT: t[KEPT] + 1}), KEPT),
    "missing_pass_through": (lambda t: t.pop(KEPT), KEPT),
    "bf16_weight": (lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"].bfloat16()}), f"{LAYER}.weight"),
    "missing_comfy_quant": (lambda t: t.pop(f"{LAYER}.comfy_quant"), f"{LAYER}.comfy_quant"),
    "wrong_comfy_quant_format": (
        lambda t: t.update(
            {f"{LAYER}.comfy_quant": torch.tensor(list(b'{"format": "float8_e5m2"}'), dtype=torch.uint8)}
        ),
        f"{LAYER}.comfy_quant",
    ),
    "extra_tensor": (lambda t: t.update({"stray.weight": torch.zeros(4)}), "stray.weight"),
}


def violations(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("VIOLATION")]


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_verify_fails_on_a_corrupted_conversion(flux_file, tmp_path, capsys, corruption):
    output = convert(flux_file, tmp_path, capsys)
    code, out, _ = run(["verify", flux_file, output], capsys)
    assert code == 0 and not violations(out)
    mutate, culprit = CORRUPTIONS[corruption]
    rewrite(output, mutate)
    code, out, _ = run(["verify", flux_file, output], capsys)
    assert code == 1
    assert any(culprit in line for line in violations(out)), out


@pytest.mark.parametrize(
    ("corruption", "culprit"),
    [
        (lambda t: t.update({"scaled_fp8": torch.empty(0, dtype=torch.float32)}), "scaled_fp8"),
        (lambda t: t.update({"scaled_fp8": torch.zeros(3, dtype=torch.float8_e4m3fn)}), "scaled_fp8"),
        (
            lambda t: t.update({f"{LAYER}.scale_weight": t[f"{LAYER}.scale_weight"].reshape(1, 1)}),
            f"{LAYER}.scale_weight",
        ),
    ],
    ids=["float32_marker", "non_empty_marker", "scale_of_shape_1x1"],
)
def test_verify_fails_on_a_corrupted_legacy_file(flux_file, tmp_path, capsys, corruption, culprit):
    output = convert(flux_file, tmp_path, capsys, "--format", "legacy")
    rewrite(output, corruption)
    code, out, _ = run(["verify", flux_file, output], capsys)
    assert code == 1
    assert any(culprit in line for line in violations(out)), out


# ---------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("target", ["comfy", "legacy"])
def test_decode_ultra8_is_exact(checkpoint_file, tmp_path, capsys, target):
    ultra8 = convert(checkpoint_file, tmp_path, capsys, "--format", "ultra8")
    decoded = tmp_path / f"decoded_{target}.safetensors"
    code, _, err = run(["decode", ultra8, "--to", target, "--output", decoded], capsys)
    assert code == 0, err
    source, _ = read_all(ultra8)
    result = load_file(str(decoded))
    scale_key = ".weight_scale" if target == "comfy" else ".scale_weight"

    layers = {k.removesuffix(".weight_scale_u8") for k in source if k.endswith(".weight_scale_u8")}
    assert layers == {k.removesuffix(scale_key) for k in result if k.endswith(scale_key)}
    assert layers
    for layer in layers:
        assert result[f"{layer}.weight"].dtype == torch.float8_e4m3fn
        assert raw(result[f"{layer}.weight"]) == raw(source[f"{layer}.weight"]), layer
        scale = result[f"{layer}{scale_key}"]
        assert scale.dtype == torch.float32 and scale.shape == ()
        assert float(scale) == codec.decode_scale(int(source[f"{layer}.weight_scale_u8"]))
        if target == "comfy":
            conf = json.loads(bytes(result[f"{layer}.comfy_quant"].tolist()))
            assert conf == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}, "still weight-only"
        else:
            assert f"{layer}.comfy_quant" not in result
    assert not [k for k in result if k.endswith(("weight_scale_u8", "ultra8_codec"))]
    markers = [k for k in result if k.endswith("scaled_fp8")]
    assert markers == (["model.diffusion_model.scaled_fp8"] if target == "legacy" else [])
    if target == "legacy":
        assert result["model.diffusion_model.scaled_fp8"].shape == (2,), "the weight-only marker"

    code, out, _ = run(["verify", checkpoint_file, decoded], capsys)
    assert code == 0, out


def test_decode_default_output_name(flux_file, tmp_path, capsys):
    ultra8 = convert(flux_file, tmp_path, capsys, "--format", "ultra8")
    code, out, err = run(["decode", ultra8], capsys)
    assert code == 0, err
    decoded = ultra8.with_name(f"{ultra8.stem}_comfy.safetensors")
    assert decoded.exists() and str(decoded) in out
    code, _, err = run(["decode", ultra8], capsys)  # the output now exists
    assert code == 1 and "error:" in err


@pytest.mark.parametrize("fmt", ["comfy", "legacy", "none"])
def test_decode_refuses_other_files(flux_file, tmp_path, capsys, fmt):
    source = flux_file if fmt == "none" else convert(flux_file, tmp_path, capsys, "--format", fmt)
    output = tmp_path / "decoded.safetensors"
    code, _, err = run(["decode", source, "--output", output], capsys)
    assert code == 1
    assert err.startswith("error:") and "ultra8" in err
    assert not output.exists()


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv",
    [
        ["--input", "{missing}", *QUICK],
        ["inspect", "{missing}"],
        ["verify", "{missing}", "{missing}"],
        ["decode", "{missing}"],
    ],
    ids=["convert", "inspect", "verify", "decode"],
)
def test_missing_file_is_an_error_not_a_traceback(tmp_path, capsys, argv):
    missing = tmp_path / "does_not_exist.safetensors"
    code, _, err = run([a.format(missing=missing) for a in argv], capsys)
    assert code == 1
    assert err.startswith("error:") and "does_not_exist.safetensors" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [["--preset", "no_such_family"], ["--format", "gguf"], ["--fp8_format", "float8_e3m4"], ["--calib_samples", "0"]],
    ids=["preset", "format", "fp8_format", "calib_samples"],
)
def test_bad_option_is_an_error_not_a_traceback(flux_file, capsys, argv):
    code, _, err = run(["--input", flux_file, *QUICK, *argv], capsys)
    assert code != 0
    assert "error:" in err and argv[0].lstrip("-").split("_")[0] in err
    assert "Traceback" not in err


def test_non_finite_weight_is_an_error_naming_the_tensor(flux_file, tmp_path, capsys):
    rewrite(flux_file, lambda t: t[f"{LAYER}.weight"].view(-1).__setitem__(7, float("nan")))
    output = tmp_path / "out.safetensors"
    code, _, err = run(["--input", flux_file, "--output", output, *QUICK], capsys)
    assert code == 1
    assert err.startswith("error:") and f"{LAYER}.weight" in err
    assert not output.exists()


def test_refusing_the_input_as_output_is_an_error(flux_file, capsys):
    before = flux_file.read_bytes()
    code, _, err = run(["--input", flux_file, "--output", flux_file, "--overwrite", *QUICK], capsys)
    assert code == 1 and err.startswith("error:")
    assert flux_file.read_bytes() == before


def test_unreadable_input_is_an_error_not_a_traceback(tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    code, _, err = run(["--input", garbage, "--output", tmp_path / "out.safetensors", *QUICK], capsys)
    assert code == 1
    assert err.startswith("error:") and "garbage.safetensors" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.safetensors"]


def test_ctrl_c_during_conversion_leaves_nothing(flux_file, tmp_path, capsys, monkeypatch):
    class InterruptingBar:
        def __init__(self, label):
            self.calls = 0

        def __call__(self, report):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt

        def activity(self, activity):
            pass

    monkeypatch.setattr("quant_core.cli.ProgressBar", InterruptingBar)
    out_dir = tmp_path / "out"
    code, _, err = run(["--input", flux_file, "--output", out_dir / "x.safetensors", "--simple"], capsys)
    assert code == 130
    assert "interrupted" in err
    assert not out_dir.exists()  # the folder the run created goes with it


def test_help_in_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "quant_core", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for spelling in ("--use_amp", "--use-amp", "--no-use_amp", "--use_shared_scales", "--calib-samples"):
        assert spelling in result.stdout


def test_a_conversion_in_a_subprocess_reports_and_exits_with_its_code(flux_file, tmp_path):
    """The command leaves without the interpreter's teardown: its summary and errors must still arrive."""
    output = tmp_path / "out" / "converted.safetensors"
    command = [sys.executable, "-m", "quant_core", "--input", str(flux_file), "--output", str(output), "--quiet"]
    done = subprocess.run([*command, "--simple"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"output    {output}" in done.stdout and re.search(r"^time\s+[0-9.]+ s$", done.stdout, re.MULTILINE)
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name]
    assert verify_files(flux_file, output).violations == []
    failed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)  # exists: no --overwrite
    assert failed.returncode == 1 and "exists" in failed.stderr
