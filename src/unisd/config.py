"""Typed configs: YAML files in `configs/` + `key.sub=value` overrides, validated with messages that say where.

Every stage has its own pydantic model (defined next to the stage, or here when shared); a run config
composes them. `load_config(Model, "configs/demo.yaml", ["train.max_steps=4"])` is the one entry point.
"""

from __future__ import annotations

import copy
import os
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


# ----------------------------------------------------------------------------------------------------------
# Checks at the door: paths and artifact folders, before any model is loaded or any stage starts. Each
# refusal is one line naming the path (or the ids/hashes that disagree) and what to do instead.


class InputError(ValueError):
    """A path or artifact folder given to unisd is missing, of the wrong kind, or from another run."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a Hugging Face id (`org/name`): absolute, ./ ../ ~, a trailing slash, or
    more than one '/'."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.endswith("/") or spec.count("/") > 1


def check_model_spec(spec: str, *, what: str = "model") -> None:
    """Refuse a model spec that cannot load, before anything loads it: a folder that does not exist, a
    file, a folder that is not a model (no config.json, no weights, no tokenizer), a train-stage output
    or LoRA adapter given where a model is expected, an unknown built-in name, a Hub id while offline and
    not cached."""
    if spec.startswith(("tiny:", "random:")):
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(
                f"{what} {spec!r} is a file; {what} takes a model folder (save_pretrained output with "
                "config.json, weights and tokenizer), a built-in name (unisd models) or tiny:<arch>"
            )
        if not (path / "config.json").is_file():
            if (path / "merged" / "config.json").is_file():
                raise InputError(
                    f"{what} {spec!r} is a train-stage output, not a model folder: pass {path / 'merged'} "
                    "(or --student for the stage commands)"
                )
            if (path / "adapter_config.json").is_file():
                raise InputError(
                    f"{what} {spec!r} is a LoRA adapter, not a full model: pass the merged model folder "
                    "(the train stage's merged/)"
                )
            raise InputError(
                f"{what} {spec!r} is a folder but not a model (no config.json in it): pass a save_pretrained "
                "folder, a built-in name (unisd models) or tiny:<arch>"
            )
        if not any(next(path.glob(g), None) for g in _WEIGHT_GLOBS):
            raise InputError(f"{what} {spec!r} has a config.json but no weights (*.safetensors / *.bin)")
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise InputError(
                f"{what} {spec!r} has no tokenizer files ({' / '.join(_TOKENIZER_FILES[:2])}): save the "
                "tokenizer next to the weights (tokenizer.save_pretrained(folder))"
            )
        return
    if _looks_like_path(spec):
        raise InputError(
            f"{what} folder {spec!r} does not exist (resolved: {path.resolve()}): check the path, or use a "
            "built-in name (unisd models) or tiny:<arch>"
        )
    if "/" in spec:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(spec, "config.json")
            except Exception:  # an id the hub library rejects
                cached = None
            if not isinstance(cached, str):
                raise InputError(
                    f"{what} {spec!r} is not a local folder, and as a Hugging Face id it is not in the local "
                    "cache while the Hub is offline (HF_HUB_OFFLINE=1): pass a local model folder or a "
                    "built-in name (unisd models)"
                )
        return
    from unisd.models import describe_spec

    describe_spec(spec)  # unknown names raise UnknownModelError, listing the built-in ones


def check_output_dir(path: str | Path, flag: str = "--out") -> None:
    """An output folder: may not exist yet, but must not be a file (nor sit under one) and must be
    writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(
            f"{flag} {path} is a file, not a folder: pass a folder path (it is created if missing)"
        )
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {parent} is not writable")


# what each stage's output folder holds (its manifest's `stage`, the payload file of a finished stage).
# A "contexts" folder is the final one (`unisd contexts --out`: written by the negatives stage); "draft" is
# the contexts stage's own (OUT/draft/), "samples" the eval stage's (OUT/samples/).
STAGE_FOLDERS = {
    "prepare": ("prepare", "train.jsonl"),
    "contexts": ("negatives", "contexts.jsonl"),
    "draft": ("contexts", "views.jsonl"),
    "rollout": ("rollout", "completions.jsonl"),
    "score": ("score", None),
    "train": ("train", None),
    "samples": ("eval", "samples.jsonl"),
}
# where a folder of that kind is, for the refusal messages (default: the folder `unisd <stage> --out` wrote)
_WRITTEN_BY = {
    "draft": "the draft/ folder of `unisd contexts --out`",
    "samples": "the samples/ folder of `unisd eval --out`",
}


def check_stage_dir(path: str | Path, stage: str, flag: str) -> list[Path]:
    """A finished stage folder of the expected kind (`stage`: a STAGE_FOLDERS key), or a gathered folder
    of them (shard-*/). Returns the stage folders. Refuses a missing path, a file, a folder whose stage did
    not finish (no manifest.json), and another stage's output."""
    from unisd.artifacts import MANIFEST, read_json

    path = Path(path).expanduser()
    writer = _WRITTEN_BY.get(stage, f"the folder `unisd {stage} --out` wrote")
    if not path.exists():
        raise InputError(f"{flag} {path} does not exist: pass {writer}")
    if not path.is_dir():
        raise InputError(f"{flag} {path} is a file: pass {writer}")
    folders = sorted(p for p in path.glob("shard-*") if p.is_dir()) or [path]
    expected, payload = STAGE_FOLDERS[stage]
    for folder in folders:
        manifest_file = folder / MANIFEST
        if not manifest_file.is_file():
            raise InputError(
                f"{flag} {folder} has no {MANIFEST}: its {expected} stage did not finish (rerun it) or this is "
                f"not a {expected} output"
            )
        found = read_json(manifest_file).get("stage")
        if found != expected:
            hint = (
                f": pass {writer}, not its draft/ folder"
                if (stage, found) == ("contexts", "contexts")
                else ""
            )
            raise InputError(f"{flag} {folder} is a {found} output, not a {expected} output{hint}")
        if payload and not read_json(manifest_file).get("skipped") and not (folder / payload).is_file():
            raise InputError(f"{flag} {folder}: its manifest says finished, but {payload} is missing")
    return folders


def check_data_files(prepare) -> list[Path]:
    """The built-in benchmarks' files (of a PrepareConfig) exist and their text decodes as UTF-8; a bad byte
    is reported with its file, line and column (the readers would fail later with no file or line). User
    datasets are checked row by row when prepare reads them (unisd.data.sources)."""
    import gzip

    from unisd.data.benchmarks import benchmark_files
    from unisd.prepare import resolve_entries

    builtins = [e.name for e in resolve_entries(prepare) if e.builtin]
    files = [f for name in builtins for f in benchmark_files(name, prepare.data_dir)]
    for file in files:
        if file.suffix == ".zip":
            continue  # read (and decrypted) in memory by its loader, which names the file
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
            raise InputError(
                f"{file}, line {line}, column {column}: byte 0x{raw[err.start]:02x} is not UTF-8: re-save the "
                "file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or restore the original"
            ) from None
    return files


def _ids(rows: list[dict[str, Any]], source: Path) -> list[str]:
    try:
        return [str(r["id"]) for r in rows]
    except KeyError:
        raise InputError(f"{source}: a row has no 'id'") from None


def _sample(ids: set[str], n: int = 3) -> str:
    return ", ".join(sorted(ids)[:n]) + (" …" if len(ids) > n else "")


def check_consistent(
    prepared: str | Path,
    *,
    contexts: str | Path | None = None,
    rollouts: list[str | Path] | None = None,
    scores: list[str | Path] | None = None,
) -> None:
    """Refuse artifacts from different runs: every rollout completion, context row and score must belong
    to the prepared items (same ids), the rollouts must cover them all, and each score's token count must
    match its rollout's completion. The refusal names the folders, the ids that disagree and the prepared
    data hash."""
    from unisd.artifacts import read_json, read_jsonl

    prepared = Path(prepared)
    manifest = read_json(prepared / "manifest.json")
    data_hash = str(manifest.get("counts", {}).get("data_hash", ""))[:12]
    train_ids = set(_ids(read_jsonl(prepared / "train.jsonl"), prepared / "train.jsonl"))
    where = f"--prepared {prepared} (data_hash {data_hash}, {len(train_ids)} items)"
    completions = _check_rollouts(rollouts or [], train_ids, where)
    if contexts is not None:
        _check_contexts(contexts, train_ids, where)
    for folder in scores or []:
        _check_scores(Path(folder), completions, train_ids, where)


def _check_rollouts(rollouts: list[str | Path], train_ids: set[str], where: str) -> dict[str, int]:
    """The completion token count of every rollout id; refuses ids not in the prepared items, or rollouts
    that leave some of them out."""
    from unisd.artifacts import read_json, read_jsonl

    completions: dict[str, int] = {}
    for folder in rollouts:
        rows = read_jsonl(Path(folder) / "completions.jsonl")
        if read_json(Path(folder) / "manifest.json").get("skipped") and not rows:
            continue
        for row in rows:
            completions[str(row["id"])] = len(row.get("completion_ids", []))
        foreign = {str(r["id"]) for r in rows} - train_ids
        if foreign:
            raise InputError(
                f"--rollouts {folder} was made from another prepare: {len(foreign)} of {len(rows)} completion "
                f"ids are not in {where} (e.g. {_sample(foreign)}); rerun the rollout stage on this prepared "
                "folder, or pass the prepared folder these rollouts came from"
            )
    if completions and set(completions) != train_ids:
        missing = train_ids - set(completions)
        raise InputError(
            f"--rollouts cover {len(completions)} of the {len(train_ids)} items of {where}: no completion for "
            f"{_sample(missing)}; pass every rollout shard (or the gathered folder)"
        )
    return completions


def _check_contexts(contexts: str | Path, train_ids: set[str], where: str) -> None:
    """Refuse a contexts folder made from another prepare (a skipped, empty one passes)."""
    from unisd.artifacts import read_json, read_jsonl

    folder = Path(contexts)
    ctx_manifest = read_json(folder / "manifest.json")
    rows = read_jsonl(folder / "contexts.jsonl")
    if rows or not ctx_manifest.get("skipped"):
        ctx_ids = set(_ids(rows, folder / "contexts.jsonl"))
        foreign, missing = ctx_ids - train_ids, train_ids - ctx_ids
        # the contexts stage may drop items (dropped.jsonl); covering none of them means another prepare
        if foreign or (missing and len(missing) == len(train_ids)):
            raise InputError(
                f"--contexts {contexts} was made from another prepare: {len(foreign)} of {len(ctx_ids)} "
                f"context ids are not in {where} (e.g. {_sample(foreign or missing)}); rerun the contexts "
                "stage on this prepared folder"
            )


def _check_scores(folder: Path, completions: dict[str, int], train_ids: set[str], where: str) -> None:
    """Refuse a scores folder whose ids are not those of the rollouts (or, without rollouts, of the prepared
    items), or whose token counts differ from the rollouts' completions."""
    from unisd.artifacts import read_json

    if not (folder / "ids.json").is_file():
        return  # a skipped scoring stage
    ids = [str(i) for i in read_json(folder / "ids.json")]
    foreign = set(ids) - (set(completions) if completions else train_ids)
    if foreign:
        against = "the given --rollouts" if completions else where
        raise InputError(
            f"--scores {folder} belong to other rollouts: {len(foreign)} of {len(ids)} scored ids are not "
            f"in {against} (e.g. {_sample(foreign)}); rerun scoring on these rollouts"
        )
    if completions:
        from safetensors import safe_open

        with safe_open(str(folder / "scores.safetensors"), "pt") as f:
            offsets = f.get_tensor("offsets").tolist()
        wrong = [i for n, i in enumerate(ids) if offsets[n + 1] - offsets[n] != completions[i]]
        if wrong:
            raise InputError(
                f"--scores {folder} were computed on other completions: the token counts of {len(wrong)} "
                f"of {len(ids)} items differ from the given --rollouts (e.g. {_sample(set(wrong))}); "
                "rerun scoring on these rollouts"
            )
