"""The recipe parser: YAML configs with command-line overrides, and clear errors for bad keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from fairvlm_hf.parser import ConfigError, FairVLMParser


@dataclass
class _Args:
    name: str = field(default="a", metadata={"help": "a name"})
    rate: float = field(default=1.0, metadata={"help": "a rate"})
    tags: list[str] = field(default_factory=lambda: ["x"], metadata={"help": "tags"})
    flag: bool = field(default=False, metadata={"help": "a flag"})


def _write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_apply_and_flags_override(tmp_path):
    config = _write(tmp_path, "name: from-yaml\nrate: 0.5\ntags: [p, q]\nflag: true\n")
    (args,) = FairVLMParser(_Args).parse_args_and_config(["--config", config, "--rate", "0.25"])
    assert (args.name, args.rate, args.tags, args.flag) == ("from-yaml", 0.25, ["p", "q"], True)


def test_no_config_uses_dataclass_defaults():
    (args,) = FairVLMParser(_Args).parse_args_and_config([])
    assert (args.name, args.rate, args.tags, args.flag) == ("a", 1.0, ["x"], False)


def test_unknown_yaml_keys_are_listed(tmp_path):
    config = _write(tmp_path, "name: b\nlerning_rate: 1\nbogus: 2\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['bogus', 'lerning_rate'\]") as info:
        FairVLMParser(_Args).parse_args_and_config(["--config", config])
    assert config in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"), [("- a\n- b\n", "expected a mapping"), ("a: [\n", "not valid YAML")]
)
def test_malformed_yaml_names_the_file(tmp_path, text, message):
    config = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        FairVLMParser(_Args).parse_args_and_config(["--config", config])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        FairVLMParser(_Args).parse_args_and_config(["--config", str(tmp_path / "nope.yaml")])


def test_unknown_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        FairVLMParser(_Args).parse_args_and_config(["--nmae", "x"])
    assert "--nmae" in capsys.readouterr().err


def test_default_config_applies_only_without_config(tmp_path):
    default = tmp_path / "default.yaml"
    default.write_text("name: default\n")
    other = _write(tmp_path, "rate: 3.0\n")
    (args,) = FairVLMParser(_Args).parse_args_and_config([], default_config=default)
    assert (args.name, args.rate) == ("default", 1.0)
    (args,) = FairVLMParser(_Args).parse_args_and_config(
        ["--config", other], default_config=default
    )
    assert (args.name, args.rate) == ("a", 3.0)
