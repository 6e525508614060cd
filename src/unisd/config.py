"""Typed configs: YAML files in `configs/` + `key.sub=value` overrides, validated with messages that say where.

Every stage has its own pydantic model (defined next to the stage, or here when shared); a run config
composes them. `load_config(Model, "configs/demo.yaml", ["train.max_steps=4"])` is the one entry point.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    pass


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` → (["train", "lr"], 1e-4). The value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    if isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-4` as a string; users mean a number.
        try:
            value = float(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` override set (intermediate dicts created)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; empty mappings stay values (MLflow params, report tables)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    """One line per bad field: `invalid config (demo.yaml with eval.limit=-1): eval.limit: Input should be
    greater than or equal to 1 (got -1)`; a single error stays on one line."""
    problems = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        shown = "" if item["type"] == "value_error" and isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{where}: {msg}{shown}")
    if len(problems) == 1:
        return f"invalid config ({source}): {problems[0]}"
    return "\n".join([f"invalid config ({source}), {len(problems)} problems:", *[f"  {p}" for p in problems]])


def validate(model: type[T], data: dict[str, Any], *, source: str = "<config>") -> T:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(
    model: type[T],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    section: str | None = None,
) -> T:
    """Load `model` from an optional YAML file (or one `section` of it) with overrides applied."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    if section is not None:
        data = data.get(section) or {}
    data = apply_overrides(data, overrides)
    source = str(path) if path else "defaults"
    if overrides:
        source += " with " + " ".join(overrides)
    return validate(model, data, source=source)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
