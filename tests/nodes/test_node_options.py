"""Widget values -> the engine's ConvertOptions: the nodes show rows of the engine's option table."""

from __future__ import annotations

import pytest


def test_defaults_are_the_engines(pack):
    assert pack.options.convert_options() == pack.convert.ConvertOptions()


def test_the_nodes_show_the_tables_node_rows_in_widget_order(pack):
    """Saved workflows list widget values by position: these names, in this order, are a contract."""
    names = [option.name for option in pack.options.NODE_OPTIONS]
    assert names == [
        "format",
        "rounding",
        "preset",
        "shared_scales",
        "fp8_format",
        "num_iter",
        "calib_samples",
        "lr",
        "reg_lambda",
        "min_tensor_size",
        "text_encoders",
        "keep_distillation",
        "exclude",
        "include",
        "seed",
        "max_size",
    ]
    assert [option.name for option in pack.options.LATE_OPTIONS] == ["max_size"]


def test_widgets_map_to_options(pack):
    options = pack.options.convert_options(
        format="ultra8",
        fp8_format="float8_e5m2",
        rounding="learned",
        num_iter=5,
        calib_samples=8,
        lr=0.1,
        reg_lambda=0.5,
        shared_scales=False,
        min_tensor_size=16,
        preset="flux",
        keep_distillation=True,
        t5xxl=True,
        text_encoders=True,
        seed=7,
        device="cpu",
    )
    assert (options.format, options.fp8_format, options.rounding) == ("ultra8", "float8_e5m2", "learned")
    learned = options.learned
    assert (learned.num_iter, learned.calib_samples, learned.lr, learned.reg_lambda, learned.seed) == (
        5,
        8,
        0.1,
        0.5,
        7,
    )
    assert (options.shared_scales, options.min_tensor_size, options.preset) == (False, 16, "flux")
    assert (options.keep_distillation, options.t5xxl, options.device) == (True, True, "cpu")
    assert options.text_encoders is True


def test_regex_widgets_hold_one_pattern_per_line(pack):
    options = pack.options.convert_options(
        exclude="  final_layer  \n\n\t\nimg_in\r\n^blocks\\.0\\.", include="attn\\.q$\n   \n"
    )
    assert options.exclude == ["final_layer", "img_in", "^blocks\\.0\\."]
    assert options.include == ["attn\\.q$"]


@pytest.mark.parametrize("mode", ["fast", "Learned", "", "rtn"])
def test_unknown_rounding_mode_is_refused(pack, mode):
    with pytest.raises(ValueError, match="rounding must be one of"):
        pack.options.convert_options(rounding=mode)


def test_fp8_compute_widget_is_weight_only_by_default(pack):
    default = pack.options.convert_options()
    assert (default.input_scales, default.uncalibrated_fp8_compute) == (False, False)
    calibrated = pack.options.convert_options(fp8_compute="calibrated", calibration="c.safetensors", rounding="nearest")
    assert (calibrated.input_scales, calibrated.uncalibrated_fp8_compute) == (True, False)
    assert calibrated.calibration == "c.safetensors" and calibrated.rounding == "nearest"
    unsafe = pack.options.convert_options(fp8_compute="uncalibrated")
    assert (unsafe.input_scales, unsafe.uncalibrated_fp8_compute) == (False, True)


def test_fp8_compute_calibrated_needs_a_calibration_file(pack):
    with pytest.raises(ValueError, match="fp8_compute 'calibrated' needs a calibration file"):
        pack.options.convert_options(fp8_compute="calibrated")
    with pytest.raises(ValueError, match="fp8_compute must be one of"):
        pack.options.convert_options(fp8_compute="fast")
