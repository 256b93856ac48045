"""The option table: the command line is generated from it, and the engine enforces its rules."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from quant_core.cli import convert_parser, main, options_from
from quant_core.options import CLI, NODE, OPTION, OPTIONS, PATTERNS, ConvertOptions

REPO = Path(__file__).resolve().parents[1]


def _flags() -> dict[str, argparse.Action]:
    return {action.dest: action for action in convert_parser()._actions}


def test_every_cli_row_is_a_flag_with_the_tables_default_and_choices():
    flags = _flags()
    for option in OPTIONS:
        if CLI not in option.fronts:
            assert option.name not in flags
            continue
        action = flags[option.name]
        assert f"--{option.cli_name}" in action.option_strings
        assert action.help.replace("%%", "%").startswith(option.help)
        assert action.default == ([] if option.kind == PATTERNS else option.default)
        assert tuple(action.choices or ()) == option.choices


def test_no_flags_give_the_tables_defaults():
    options = options_from(convert_parser().parse_args(["--input", "x.safetensors"]))
    assert options == ConvertOptions()
    for option in OPTIONS:
        assert options.value(option.name) == (list(option.default) if option.kind == PATTERNS else option.default)


def test_help_is_in_the_users_words():
    """The same text reaches node tooltips: no command-line flags, no 'seed' meaning the original script."""
    for option in OPTIONS:
        assert "--" not in option.help, option.name
        assert "the seed" not in option.help, option.name


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.minimum is not None or o.maximum is not None])
def test_ranges_are_enforced_for_every_front_end(option, capsys):
    low = (
        option.minimum - (1 if option.kind is int else option.minimum / 2 + 1e-3)
        if option.minimum is not None
        else None
    )
    value = low if low is not None else option.maximum + 1
    with pytest.raises(ValueError, match=f"^{option.name} must be at"):
        ConvertOptions.from_values({option.name: value})
    if CLI in option.fronts:
        assert main(["--input", "x.safetensors", f"--{option.cli_name}", str(value)]) == 1
        assert f"{option.name} must be at" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"input_scales": True}, "need a calibration file"),
        ({"full_precision_above": 0.02}, "need a calibration file"),
        ({"calibration": "c.safetensors", "rounding": "nearest"}, "needs rounding 'auto' or 'learned'"),
        ({"format": "ultra16"}, "format must be one of"),
        ({"full_precision": ["("]}, "invalid full_precision regex"),
        ({"shard": (3, 2)}, "shard"),
    ],
)
def test_rules_between_settings_name_the_settings(values, message):
    with pytest.raises(ValueError, match=message) as error:
        ConvertOptions.from_values(values)
    assert "--" not in str(error.value)


def test_calibration_with_nearest_rounding_is_allowed_for_input_scales():
    options = ConvertOptions.from_values({"calibration": "c.safetensors", "rounding": "nearest", "input_scales": True})
    assert options.rounding == "nearest" and options.input_scales


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="unknown settings"):
        ConvertOptions.from_values({"iterations": 3})


def test_rows_say_where_they_are_shown():
    assert {NODE, CLI} == {front for option in OPTIONS for front in option.fronts}
    assert OPTION["shared_scales"].cli_name == "use_shared_scales"
    assert all(option.group in ("basic", "advanced") for option in OPTIONS)


def options_table() -> str:
    """The convert options as docs/cli.md shows them, rendered from the table (never written by hand)."""
    rows = ["| option | default | node | what it does |", "|---|---|---|---|"]
    for option in OPTIONS:
        if CLI not in option.fronts:
            continue
        flag = f"`--{option.cli_name}`"
        if option.kind is bool and option.default:
            flag += f" / `--no-{option.cli_name}`"
        elif option.kind == PATTERNS:
            flag += " REGEX"
        elif option.choices:
            flag += " {" + ",".join(option.choices) + "}"
        elif option.kind is not bool:
            metavars = {"shard": " K/N", "calibration": " FILE", "device": " DEVICE", "max_size": " SIZE"}
            flag += metavars.get(option.name, " N")
        default = {None: "–", (): "–", "": "–", True: "on", False: "off"}.get(option.default, f"`{option.default}`")
        node = ("yes" if option.group == "basic" else "advanced") if NODE in option.fronts else "–"
        rows.append(f"| {flag} | {default} | {node} | {option.help} |")
    return "\n".join(rows) + "\n"


def test_the_documented_options_are_the_table():
    """docs/cli.md shows the table as rendered here; on a change, paste this output there."""
    assert options_table() in (REPO / "docs" / "cli.md").read_text(), options_table()
