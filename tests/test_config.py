from __future__ import annotations

import pytest

from unisd.config import ConfigError, StrictModel, apply_overrides, load_config, parse_override


class Inner(StrictModel):
    lr: float = 1e-4
    steps: int = 10


class Outer(StrictModel):
    name: str = "x"
    inner: Inner = Inner()
    tags: list[str] = []


def test_parse_override_yaml_values():
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("flag=true") == (["flag"], True)
    assert parse_override("xs=[a, b]") == (["xs"], ["a", "b"])
    assert parse_override("s=") == (["s"], "")


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1"])
def test_parse_override_rejects(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_apply_overrides_does_not_mutate_and_nests():
    base = {"inner": {"lr": 1.0}}
    out = apply_overrides(base, ["inner.steps=3", "name=y"])
    assert base == {"inner": {"lr": 1.0}}
    assert out == {"inner": {"lr": 1.0, "steps": 3}, "name": "y"}
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_load_config_from_yaml_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, p, ["inner.steps=7"])
    assert cfg == Outer(name="demo", inner=Inner(lr=0.5, steps=7))


def test_validation_error_names_file_and_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("inner:\n  steps: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, p)
    assert "bad.yaml" in str(err.value) and "inner.steps" in str(err.value)


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="inner.lrr"):
        load_config(Outer, None, ["inner.lrr=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, tmp_path / "list.yaml")
