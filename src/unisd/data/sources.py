"""User datasets: where they come from, how they are read, validated and fingerprinted (docs/datasets.md).

A dataset is a `DatasetSpec` (in a run config: `prepare.datasets: {name: {source, kind, columns, ...}}`),
or a bare source written straight into `prepare.benchmarks`. A source is one of

    ./support.jsonl  /mnt/volume/support/        a local file or folder (a mounted volume is a folder)
    s3://bucket/key  gs://bucket/key  az://container/key     object storage, through fsspec
    hf://org/name  hf://org/name:config          a Hugging Face Hub dataset (datasets.load_dataset)
    ./saved/                                     a folder written by datasets' save_to_disk

Files are JSON Lines, JSON, CSV or Parquet (by extension, or `format:`); a folder is every such file in
it. Every file is parsed by the `datasets` library (`load_dataset("json" | "csv" | "parquet")`,
`load_from_disk`); object-storage files are first copied by fsspec into a temporary folder, so that
`HF_HUB_OFFLINE=1` (which blocks `datasets` from any remote URL) never stands between a pod and its bucket.

Credentials are never part of a config: s3fs / gcsfs / adlfs read them from the environment (in a cluster,
a Kubernetes Secret mounted as env). An S3-compatible endpoint comes from $AWS_ENDPOINT_URL_S3 or
$AWS_ENDPOINT_URL.

    load_dataset_records(name, spec) -> LoadedDataset     every row validated (schema.py), then Records
    source_fingerprint(spec) -> (local files, remote fingerprint)   what prepare's skip-if-done hashes
    fetch_file(uri) -> Path                               a cached local copy (built-in data dir on S3)
    upload_files(local_dir, relatives, target)            `unisd data upload`
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from unisd.config import StrictModel
from unisd.data import schema
from unisd.data.records import Record

log = logging.getLogger(__name__)

# fsspec protocol -> the package that implements it
OBJECT_STORES: dict[str, str] = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
SAVED_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_ERRORS_SHOWN = 10
CREDENTIAL_KEYS = {
    "key",
    "secret",
    "token",
    "password",
    "credentials",
    "storage_options",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
    "account_key",
    "sas_token",
    "connection_string",
    "hf_token",
}
CREDENTIAL_HINTS: dict[str, str] = {
    "s3fs": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones)",
    "gcsfs": "GOOGLE_APPLICATION_CREDENTIALS (the path of a service-account key file) or workload identity",
    "adlfs": "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY",
}


class SourceError(ValueError):
    """A dataset source that cannot be used; the message says what to fix."""


class DatasetError(ValueError):
    """A dataset whose rows break the schema (beyond max_bad_rows), or with duplicate ids."""


# --------------------------------------------------------------------------------------------------
# The config of one dataset


class DatasetSpec(StrictModel):
    """One user dataset (a value of `prepare.datasets`)."""

    source: str  # a path, s3:// gs:// az:// URI, hf://org/name[:config], or a save_to_disk folder
    kind: str | None = None  # multiple_choice | code | tool_use | free_form; None: inferred from the columns
    columns: dict[
        str, str | list[str]
    ] = {}  # schema field -> your column (a list: several columns, one list)
    split: str | None = None  # put every row in this split (e.g. `test` for an eval-only dataset)
    splits: dict[str, str] = {}  # a Hub / saved dataset's split -> train | validation | test | seeded
    format: Literal["json", "csv", "parquet"] | None = None  # default: from each file's extension
    field: str | None = None  # JSON files holding {"<field>": [rows]}: the key of the rows
    metric: Literal["rougeL", "chrf", "exact_match"] | None = None  # free_form only (default rougeL)
    revision: str | None = None  # hf:// only: a branch, tag or commit
    max_bad_rows: int | None = Field(
        None, ge=0
    )  # rows that break the schema and are skipped; None: prepare's

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        # Secrets are masked in the input itself before refusing it: validation errors echo their input.
        if isinstance(data, dict):
            source = data.get("source")
            if isinstance(source, str) and has_uri_credentials(source):
                data["source"] = _redact(source)
                parse_source(source)  # raises, naming the redacted URI
            found = sorted(k for k in data if str(k).lower() in CREDENTIAL_KEYS)
            if found:
                for key in found:
                    data[key] = "***"
                raise ValueError(
                    f"{found} look like credentials or storage options; a config never holds them (it is "
                    "logged to MLflow). Set them in the environment instead -- in a cluster, a Kubernetes "
                    "Secret mounted as env (see docs/datasets.md, 'Credentials')"
                )
        return data

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        parse_source(value)  # raises on credentials in the URI or an unknown scheme
        return value

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str | None) -> str | None:
        if value is not None and value not in schema.KINDS:
            raise ValueError(f"unknown kind {value!r}; expected one of {', '.join(schema.KINDS)}")
        return value

    @field_validator("split")
    @classmethod
    def _fixed_split(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = schema.SPLIT_ALIASES.get(value, value)
        if name not in schema.SPLITS:
            raise ValueError(f"split {value!r} is not one of {', '.join(schema.SPLITS)}")
        return name

    @field_validator("splits")
    @classmethod
    def _split_map(cls, value: dict[str, str]) -> dict[str, str]:
        bad = {
            k: v for k, v in value.items() if schema.SPLIT_ALIASES.get(v, v) not in (*schema.SPLITS, "seeded")
        }
        if bad:
            raise ValueError(f"splits {bad}: each must map to train, validation, test or seeded")
        return {k: schema.SPLIT_ALIASES.get(v, v) for k, v in value.items()}

    @model_validator(mode="after")
    def _columns_known(self) -> DatasetSpec:
        if self.kind is not None:
            unknown = sorted(set(self.columns) - set(schema.fields_of(self.kind)))
            if unknown:
                raise ValueError(
                    f"columns maps {unknown}, which are not fields of {self.kind} "
                    f"(fields: {', '.join(schema.fields_of(self.kind))}); the mapping is field: your_column"
                )
        if self.metric is not None and self.kind not in (None, "free_form"):
            raise ValueError(f"metric is for free_form datasets, not {self.kind}")
        return self


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    text: str  # as written in the config
    scheme: str  # "file", "hf", or an fsspec object-store protocol
    path: str  # a local path, a bucket path (no protocol), or a Hub repo id
    config: str | None = None  # hf:// only

    @property
    def remote(self) -> bool:
        return self.scheme in OBJECT_STORES


def parse_source(text: str) -> Source:
    """Classify a source string; refuses credentials inside the URI and unknown schemes."""
    if not isinstance(text, str) or not text.strip():
        raise SourceError("a dataset source is empty")
    text = text.strip()
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", text)
    if not match:
        return Source(text, "file", str(Path(text).expanduser()))
    scheme, rest = match.group(1).lower(), match.group(2)
    authority = rest.split("/", 1)[0]
    if "@" in authority and ":" in authority.split("@", 1)[0]:
        raise SourceError(
            f"{_redact(text)}: the URI holds credentials (user:secret@...); put them in the environment instead "
            "(in a cluster: a Kubernetes Secret mounted as env)"
        )
    if scheme == "file":
        return Source(text, "file", str(Path(rest).expanduser()))
    if scheme == "hf":
        repo = rest.removeprefix("datasets/").strip("/")
        repo, _, config = repo.partition(":")
        if not re.match(r"^[\w.-]+(/[\w.-]+)?$", repo):
            raise SourceError(f"{text}: expected hf://org/name or hf://org/name:config")
        return Source(text, "hf", repo, config or None)
    if scheme in OBJECT_STORES:
        if not rest.strip("/"):
            raise SourceError(f"{text}: names no bucket")
        return Source(text, scheme, rest.rstrip("/"))
    raise SourceError(
        f"{text}: unsupported scheme {scheme}://; use a path, s3://, gs://, az:// (abfs://) or hf:// "
        "(see docs/datasets.md)"
    )


def has_uri_credentials(text: str) -> bool:
    """Whether a URI spells user:secret@ in its authority."""
    match = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/]*)", text.strip())
    return bool(match) and "@" in match.group(1) and ":" in match.group(1).split("@", 1)[0]


def mask_credentials(items: list[Any]) -> list[str]:
    """Mask user:secret@ in the URIs of a list, in place (validation errors echo their input); returns the
    masked URIs."""
    masked = []
    for i, item in enumerate(items):
        if isinstance(item, str) and has_uri_credentials(item):
            items[i] = _redact(item)
            masked.append(items[i])
    return masked


def make_spec(**fields: Any) -> DatasetSpec:
    """A DatasetSpec whose validation errors read as one plain sentence each (no pydantic dump)."""
    try:
        return DatasetSpec.model_validate(fields)
    except ValidationError as err:
        messages = [str(e["msg"]).removeprefix("Value error, ") for e in err.errors()]
        raise SourceError("; ".join(messages)) from None


def _redact(text: str) -> str:
    return re.sub(r"://[^/@]*@", "://***@", text)


def is_source(entry: str) -> bool:
    """Whether a `prepare.benchmarks` entry is a dataset source (path or URI) rather than a name."""
    return (
        "://" in entry
        or "/" in entry
        or entry.startswith((".", "~"))
        or Path(entry).suffix.lower() in FORMATS
    )


def dataset_name(entry: str) -> str:
    """The name of a `prepare.benchmarks` entry: a name as is; a source's file or folder stem, lower-cased,
    with other characters than a-z 0-9 _ - turned into "-" (hf://org/name:config → name-config)."""
    if not is_source(entry):
        return entry
    source = parse_source(entry)
    if source.scheme == "hf":
        base = source.path.split("/")[-1] + (f"-{source.config}" if source.config else "")
    else:
        base = Path(source.path.rstrip("/")).name
        while Path(base).suffix.lower() in FORMATS:
            base = Path(base).stem
    name = re.sub(r"[^a-z0-9_-]+", "-", base.lower()).strip("-_")[:64]
    if not name or not NAME.match(name):
        raise SourceError(f"{entry}: cannot derive a dataset name from it; name it in prepare.datasets")
    return name


def storage_options(scheme: str) -> dict[str, Any]:
    """fsspec options from the environment only (never from a config): the S3 endpoint."""
    if OBJECT_STORES.get(scheme) == "s3fs":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def _filesystem(source: Source):
    import fsspec

    package = OBJECT_STORES[source.scheme]
    try:
        return fsspec.filesystem(source.scheme, **storage_options(source.scheme))
    except (ImportError, ValueError) as err:
        if isinstance(err, ImportError) or "protocol" in str(err).lower():
            raise SourceError(
                f"{source.text}: reading {source.scheme}:// needs the package {package} "
                f"(pip install {package}, at the version matching fsspec)"
            ) from None
        raise


def explain(source: Source | str, err: BaseException) -> SourceError | FileNotFoundError:
    """A storage error as a message naming what to fix (credentials, endpoint, path, permissions)."""
    source = parse_source(source) if isinstance(source, str) else source
    text, name, detail = source.text, type(err).__name__, str(err)
    package = OBJECT_STORES.get(source.scheme, "")
    hint = CREDENTIAL_HINTS.get(package, "the storage credentials")
    if name in (
        "NoCredentialsError",
        "PartialCredentialsError",
        "DefaultCredentialsError",
        "CredentialRetrievalError",
    ) or ("unable to locate credentials" in detail.lower()):
        return SourceError(
            f"{text}: no credentials found for {source.scheme}://. Set {hint} in the environment (in a "
            "cluster: a Kubernetes Secret mounted as env); a config never holds credentials"
        )
    if name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ClientConnectorError",
        "ServerTimeoutError",
    ) or (isinstance(err, ConnectionError | TimeoutError) or "could not connect" in detail.lower()):
        endpoint = storage_options(source.scheme).get("client_kwargs", {}).get("endpoint_url")
        where = f" {endpoint}" if endpoint else ""
        return SourceError(
            f"{text}: cannot reach the storage endpoint{where} ({detail}). Check the URI"
            + (", $AWS_ENDPOINT_URL" if package == "s3fs" else "")
            + " and the network (a NetworkPolicy may block the pod's egress)"
        )
    if any(s in detail for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")):
        return SourceError(f"{text}: the credentials were refused ({detail}). Check {hint}")
    if isinstance(err, PermissionError) or any(s in detail for s in ("AccessDenied", "Forbidden", "403")):
        return SourceError(
            f"{text}: access denied ({detail}). The credentials in the environment may not read it"
        )
    if isinstance(err, FileNotFoundError) or "NoSuchKey" in detail or "NoSuchBucket" in detail:
        return FileNotFoundError(f"{text}: does not exist ({detail or 'not found'})")
    return SourceError(f"{text}: cannot be read ({name}: {detail})")


@contextmanager
def _storage_errors(source: Source) -> Iterator[None]:
    try:
        yield
    except (SourceError, DatasetError):
        raise
    except Exception as err:  # noqa: BLE001 -- every storage library raises its own types
        raise explain(source, err) from err


# --------------------------------------------------------------------------------------------------
# Listing a source's files


@dataclass(frozen=True)
class DataFile:
    label: str  # for messages: the source for a single file, source/relative inside a folder
    path: str  # a local path, or the bucket path (no protocol)
    relative: str  # relative to the source ("" for a single file)
    size: int | None = None
    version: str | None = None  # ETag / md5 / generation / mtime: what changes when the content does


@dataclass
class Listing:
    source: Source
    layout: Literal["files", "saved", "hub"]
    files: list[DataFile] = field(default_factory=list)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "source": self.source.text,
            "layout": self.layout,
            "files": [[f.relative, f.size, f.version] for f in self.files],
        }


def _version(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "crc32c", "generation", "VersionId", "version_id"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        if info.get(key):
            return str(info[key])
    return None


def _is_data_file(relative: str, fmt: str | None) -> bool:
    parts = Path(relative).parts
    if any(p.startswith((".", "_")) for p in parts):
        return False
    return fmt is not None or Path(relative).suffix.lower() in FORMATS


def _saved_layout(names: set[str]) -> bool:
    return any(all(m in names for m in markers) for markers in SAVED_MARKERS)


def list_source(source: Source, fmt: str | None = None) -> Listing:
    """The data files of a source (a folder: every data file in it, sorted), or its saved/hub layout."""
    if source.scheme == "hf":
        return Listing(source, "hub")
    if source.scheme == "file":
        return _list_local(source, fmt)
    fs = _filesystem(source)
    with _storage_errors(source):
        info = fs.info(source.path)
        if info.get("type") != "directory":
            return Listing(
                source, "files", [DataFile(source.text, source.path, "", info.get("size"), _version(info))]
            )
        found = fs.find(source.path, detail=True)
    entries = {k[len(source.path) :].lstrip("/"): v for k, v in found.items() if v.get("type") != "directory"}
    top = {r for r in entries if "/" not in r}
    if _saved_layout(top):
        files = [
            DataFile(f"{source.text}/{r}", f"{source.path}/{r}", r, v.get("size"), _version(v))
            for r, v in sorted(entries.items())
        ]
        return Listing(source, "saved", files)
    files = [
        DataFile(f"{source.text.rstrip('/')}/{r}", f"{source.path}/{r}", r, v.get("size"), _version(v))
        for r, v in sorted(entries.items())
        if _is_data_file(r, fmt)
    ]
    if not files:
        raise SourceError(f"{source.text}: holds no {', '.join(sorted(FORMATS))} files")
    return Listing(source, "files", files)


def _list_local(source: Source, fmt: str | None) -> Listing:
    path = Path(source.path)
    if not path.exists():
        raise FileNotFoundError(f"{source.text}: no such file or folder")
    if path.is_file():
        stat = path.stat()
        return Listing(
            source, "files", [DataFile(source.text, str(path), "", stat.st_size, str(stat.st_mtime_ns))]
        )
    entries = sorted(p for p in path.rglob("*") if p.is_file())
    if _saved_layout({p.name for p in path.iterdir() if p.is_file()}):
        files = [DataFile(str(p), str(p), str(p.relative_to(path)), p.stat().st_size) for p in entries]
        return Listing(source, "saved", files)
    files = [
        DataFile(str(p), str(p), str(p.relative_to(path)), p.stat().st_size, str(p.stat().st_mtime_ns))
        for p in entries
        if _is_data_file(str(p.relative_to(path)), fmt)
    ]
    if not files:
        raise SourceError(f"{source.text}: holds no {', '.join(sorted(FORMATS))} files")
    return Listing(source, "files", files)


def _hub_fingerprint(source: Source, revision: str | None) -> dict[str, Any]:
    """The Hub commit the dataset resolves to (None when the Hub cannot be reached: then a cached copy, if
    any, is what `datasets` reads, and the fingerprint falls back to the repo + revision)."""
    sha = None
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(source.path, revision=revision).sha
    except Exception as err:  # noqa: BLE001 -- offline, gated, missing: the load itself says which
        log.info("%s: no Hub commit for the fingerprint (%s)", source.text, err)
    return {"source": source.text, "layout": "hub", "config": source.config, "revision": revision, "sha": sha}


def source_fingerprint(spec: DatasetSpec) -> tuple[list[Path], dict[str, Any]]:
    """(local files, fingerprint) of a dataset: prepare hashes the local files' contents and the
    fingerprint (object storage: every file's size + ETag/md5/generation; the Hub: the commit sha), so an
    unchanged source skips and a changed one reruns -- without downloading anything to decide."""
    source = parse_source(spec.source)
    if source.scheme == "hf":
        return [], _hub_fingerprint(source, spec.revision)
    listing = list_source(source, spec.format)
    if source.scheme == "file":
        return [Path(f.path) for f in listing.files], {"source": source.text, "layout": listing.layout}
    return [], listing.fingerprint()


# --------------------------------------------------------------------------------------------------
# Reading (through the `datasets` library)


@dataclass
class Table:
    label: str  # the file (for messages)
    rows: list[dict[str, Any]]
    split: str | None = None  # a Hub / saved DatasetDict's split name
    first_row: int = 1


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _file_format(file: DataFile, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = Path(file.relative or file.path).suffix.lower()
    if suffix not in FORMATS:
        raise SourceError(
            f"{file.label}: cannot tell the format from the extension {suffix or '(none)'}; "
            f"use one of {', '.join(sorted(FORMATS))} or set format: json | csv | parquet"
        )
    return FORMATS[suffix]


def _check_text_file(label: str, data: bytes, fmt: str, json_field: str | None) -> None:
    """Refuse non-UTF-8 bytes, empty files and (JSON Lines) lines that are not JSON objects, naming the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SourceError(
            f"{label}: line {line}: not valid UTF-8 (byte 0x{data[err.start]:02X} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None
    if not text.strip():
        raise SourceError(f"{label}: no rows (the file is empty)")
    if fmt == "csv" and sum(1 for line in text.splitlines() if line.strip()) < 2:
        raise SourceError(f"{label}: no rows (only a header line)")
    if fmt != "json":
        return
    stripped = text.lstrip("\ufeff").lstrip()
    if stripped[:1] in "[{" and Path(label).suffix.lower() == ".json":
        try:
            whole = json.loads(stripped)
        except json.JSONDecodeError:
            whole = None  # maybe JSON Lines in a .json file: checked line by line below
        if whole is not None:
            rows = whole.get(json_field) if isinstance(whole, dict) and json_field else whole
            if isinstance(whole, dict) and not json_field:
                raise SourceError(
                    f"{label}: a JSON object, not a list of rows; if the rows are under a key, set field: <key>"
                )
            if not isinstance(rows, list):
                raise SourceError(
                    f"{label}: expected a list of row objects"
                    + (f" under {json_field!r}" if json_field else "")
                )
            bad = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict)]
            if bad:
                raise SourceError(f"{label}: row {bad[0]}: not a JSON object ({len(bad)} such rows)")
            if not rows:
                raise SourceError(f"{label}: no rows (an empty list)")
            return
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {number}: not valid JSON ({err.msg}, column {err.colno})")
            continue
        if not isinstance(value, dict):
            problems.append(f"line {number}: a JSON {type(value).__name__}, where a row object is expected")
    if problems:
        shown = "\n  ".join(f"{label}: {p}" for p in problems[:MAX_ERRORS_SHOWN])
        raise SourceError(
            f"{label}: {len(problems)} line(s) are not JSON objects (the file is refused whole):\n  {shown}"
        )


def _read_file(label: str, path: str, fmt: str, json_field: str | None) -> list[dict[str, Any]]:
    """Rows of one local file, parsed by `datasets` (after the text checks above)."""
    if fmt in ("json", "csv"):
        _check_text_file(label, Path(path).read_bytes(), fmt, json_field)
    datasets = _quiet_datasets()
    kwargs: dict[str, Any] = {"field": json_field} if fmt == "json" and json_field else {}
    with tempfile.TemporaryDirectory(prefix="unisd-datasets-") as cache:
        try:
            table = datasets.load_dataset(fmt, data_files=[path], split="train", cache_dir=cache, **kwargs)
        except Exception as err:  # noqa: BLE001 -- pyarrow / pandas parse errors
            cause = err.__cause__ or err.__context__ or err
            what = {"csv": "CSV", "parquet": "Parquet", "json": "JSON"}[fmt]
            raise SourceError(f"{label}: not a valid {what} file ({type(cause).__name__}: {cause})") from None
        return table.to_list()


def _tables_from_dataset(label: str, loaded: Any) -> list[Table]:
    """Tables of a `datasets` Dataset or DatasetDict (one per split)."""
    if isinstance(loaded, dict):  # a DatasetDict
        return [Table(f"{label}[{split}]", loaded[split].to_list(), split) for split in loaded]
    return [Table(label, loaded.to_list())]


@contextmanager
def _local_copy(listing: Listing) -> Iterator[Path | None]:
    """A local folder with the listing's files (object storage: copied by fsspec into a temporary folder,
    deleted afterwards); None for a local source, whose files are read in place."""
    if listing.source.scheme == "file":
        yield None
        return
    fs = _filesystem(listing.source)
    with tempfile.TemporaryDirectory(prefix="unisd-source-") as tmp:
        with _storage_errors(listing.source):
            for f in listing.files:
                target = Path(tmp) / (f.relative or Path(f.path).name)
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f.path, str(target))
        yield Path(tmp)


def read_tables(spec: DatasetSpec) -> list[Table]:
    """Every table of a dataset's source, as plain rows (before the column mapping)."""
    source = parse_source(spec.source)
    if source.scheme == "hf":
        return _read_hub(source, spec)
    listing = list_source(source, spec.format)
    with _local_copy(listing) as local:
        if listing.layout == "saved":
            root = local if local is not None else Path(source.path)
            datasets = _quiet_datasets()
            try:
                loaded = datasets.load_from_disk(str(root))
            except Exception as err:  # noqa: BLE001
                raise SourceError(f"{source.text}: not a readable save_to_disk folder ({err})") from None
            return _tables_from_dataset(source.text, loaded)
        tables = []
        for f in listing.files:
            path = str(local / (f.relative or Path(f.path).name)) if local is not None else f.path
            tables.append(Table(f.label, _read_file(f.label, path, _file_format(f, spec.format), spec.field)))
        return tables


def _read_hub(source: Source, spec: DatasetSpec) -> list[Table]:
    """A Hub dataset, every split: datasets.load_dataset("org/name", config, revision=...). A gated or
    private dataset needs $HF_TOKEN in the environment."""
    datasets = _quiet_datasets()
    try:
        loaded = datasets.load_dataset(source.path, source.config, revision=spec.revision)
    except Exception as err:  # noqa: BLE001 -- offline, gated, missing config ...
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        raise SourceError(
            f"{source.text}: cannot load it from the Hugging Face Hub ({type(err).__name__}: {err})."
            + (" HF_HUB_OFFLINE is set, so only a cached copy could be used." if offline else "")
            + " Check the name and config, set HF_TOKEN for a gated dataset, or save it with "
            "save_to_disk and point at that folder"
        ) from None
    return _tables_from_dataset(source.text, loaded)


# --------------------------------------------------------------------------------------------------
# Validation: column mapping, schema, splits, duplicates


@dataclass(frozen=True)
class RowError:
    label: str
    row: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.label}: row {self.row}"
        return f"{where}: field {self.field!r}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclass
class LoadedDataset:
    name: str
    kind: str
    source: str
    records: list[Record]
    bad_rows: list[RowError]
    rows_read: int
    ignored_columns: list[str]
    max_bad_rows: int
    duplicates: list[str] = field(default_factory=list)

    @property
    def bad_row_numbers(self) -> list[tuple[str, int]]:
        return sorted({(e.label, e.row) for e in self.bad_rows})

    def problem(self) -> str | None:
        """Why the dataset is refused (duplicate ids; more bad rows than max_bad_rows; none valid), or None."""
        if self.duplicates:
            shown = "\n  ".join(self.duplicates[:MAX_ERRORS_SHOWN])
            return f"{self.name}: {len(self.duplicates)} duplicate id(s); ids must be unique:\n  {shown}"
        n_bad = len(self.bad_row_numbers)
        if n_bad > self.max_bad_rows:
            shown = "\n  ".join(str(e) for e in self.bad_rows[:MAX_ERRORS_SHOWN])
            more = (
                f"\n  ... and {len(self.bad_rows) - MAX_ERRORS_SHOWN} more"
                if len(self.bad_rows) > MAX_ERRORS_SHOWN
                else ""
            )
            return (
                f"{self.name}: {n_bad} of {self.rows_read} rows break the {self.kind} schema "
                f"(max_bad_rows {self.max_bad_rows}):\n  {shown}{more}\nFix them, or skip up to N bad rows "
                "with max_bad_rows: N (prepare.max_bad_rows, prepare.datasets.<name>.max_bad_rows, or "
                "--max-bad-rows)"
            )
        if not self.records:
            return f"{self.name}: no valid rows ({self.rows_read} read)"
        return None

    def split_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(schema.SPLITS, 0)
        for r in self.records:
            counts[r.split] += 1
        return counts

    def rows(self, split: str) -> list[Record]:
        """The records of one split ("all": every record); an empty split is an error naming the fix."""
        if split == "all":
            return list(self.records)
        if split not in schema.SPLITS:
            raise ValueError(
                f"{self.name}: unknown split {split!r}; user datasets have {', '.join(schema.SPLITS)}"
            )
        records = [r for r in self.records if r.split == split]
        if not records:
            counts = ", ".join(f"{s} {n}" for s, n in self.split_counts().items())
            raise DatasetError(
                f"{self.name} ({self.source}): the {split} split has no rows (rows per split: {counts}). "
                f"Give rows split: {split}, or leave the split column out so that the seeded 50/10/40 rule "
                "assigns every row (docs/datasets.md, 'Splits')"
            )
        return records


def _friendly(error: dict[str, Any]) -> tuple[str | None, str]:
    """(field, message) of one pydantic error."""
    loc = [str(p) for p in error.get("loc", ())]
    field_name = loc[0] if loc else None
    for part in loc[1:]:
        field_name = f"{field_name}[{part}]" if part.isdigit() else f"{field_name}.{part}"
    kind, message = error.get("type", ""), str(error.get("msg", ""))
    if kind == "missing":
        message = "is missing (map one of your columns to it with columns: {field: your_column})"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    else:
        got = error.get("input")
        message = message[:1].lower() + message[1:] + (f", got {got!r}"[:80] if got is not None else "")
    return field_name, message


def map_columns(row: dict[str, Any], columns: dict[str, str | list[str]]) -> dict[str, Any]:
    """A row with the dataset's column mapping applied (field: column; a list of columns makes a list)."""
    out = dict(row)
    for field_name, column in columns.items():
        out[field_name] = [row.get(c) for c in column] if isinstance(column, list) else row.get(column)
    return out


def _check_mapping(table: Table, columns: dict[str, str | list[str]]) -> None:
    if not table.rows:
        return
    present = set().union(*(r.keys() for r in table.rows[:1000]))
    for field_name, column in columns.items():
        for col in column if isinstance(column, list) else [column]:
            if col not in present:
                raise SourceError(
                    f"{table.label}: columns maps {field_name!r} to {col!r}, but the table has no column "
                    f"{col!r} (its columns: {', '.join(sorted(present))})"
                )


def _split_of(row: schema.UserRow, table: Table, spec: DatasetSpec, label: str) -> str | None:
    """spec.split > the row's split > the source's split (mapped by spec.splits) > None (seeded)."""
    if spec.split:
        return spec.split
    if row.split:
        return row.split
    if table.split is None:
        return None
    mapped = spec.splits.get(table.split) or schema.SPLIT_ALIASES.get(table.split, table.split)
    if mapped == "seeded":
        return None
    if mapped not in schema.SPLITS:
        raise SourceError(
            f"{label}: has a split named {table.split!r}; map it with splits: "
            f"{{{table.split}: train | validation | test | seeded}}"
        )
    return mapped


def load_dataset_records(
    name: str, spec: DatasetSpec, *, max_bad_rows: int = 0, enforce: bool = True
) -> LoadedDataset:
    """Read, map, validate and convert every row of dataset `name`.

    Rows that break the schema are reported with file, row number and field; more than the dataset's
    max_bad_rows (else `max_bad_rows`) of them refuses the dataset (DatasetError), and so do duplicate ids.
    An empty dataset and unusable sources (SourceError / FileNotFoundError) always refuse it. With
    enforce=False the dataset comes back with its problems recorded instead (`unisd data validate`).
    """
    _check_dataset_name(name)
    limit = spec.max_bad_rows if spec.max_bad_rows is not None else max_bad_rows
    tables, rows_read = _read_mapped_tables(name, spec)
    kind, model, ignored = _row_model_of(spec, tables)
    valid, bad = _validate_rows(tables, spec, model)
    records, duplicates = _unique_records(name, spec, valid)
    loaded = LoadedDataset(name, kind, spec.source, records, bad, rows_read, ignored, limit, duplicates)
    problem = loaded.problem()
    if problem and enforce:
        raise DatasetError(problem)
    for e in bad if not problem else []:
        log.warning("%s: skipped bad row: %s", name, e)
    return loaded


def _check_dataset_name(name: str) -> None:
    """Refuses (SourceError) a dataset name that is malformed or taken by a built-in benchmark."""
    from unisd.data.benchmarks import BENCHMARK_SPECS

    if not NAME.match(name):
        raise SourceError(f"dataset name {name!r}: use 1-64 of a-z 0-9 _ - (starting with a letter or digit)")
    if name in BENCHMARK_SPECS:
        raise SourceError(f"dataset name {name!r} is a built-in benchmark; choose another name")


def _read_mapped_tables(name: str, spec: DatasetSpec) -> tuple[list[Table], int]:
    """Returns (the dataset's tables, rows read); SourceError on no rows or a mapped column missing."""
    tables = read_tables(spec)
    rows_read = sum(len(t.rows) for t in tables)
    if rows_read == 0:
        raise SourceError(f"{name} ({spec.source}): no rows (every table is empty)")
    for table in tables:
        _check_mapping(table, spec.columns)
    return tables, rows_read


def _row_model_of(spec: DatasetSpec, tables: list[Table]) -> tuple[str, type[schema.UserRow], list[str]]:
    """Returns (the task kind, its row model, the columns no field uses), the kind inferred unless given."""
    mapped_columns = set(spec.columns).union(*(t.rows[0].keys() for t in tables if t.rows))
    kind = spec.kind or schema.infer_kind(mapped_columns)
    model = schema.row_model(kind)
    ignored = sorted(mapped_columns - set(model.model_fields) - set(_flat(spec.columns.values())))
    return kind, model, ignored


def _validate_rows(
    tables: list[Table], spec: DatasetSpec, model: type[schema.UserRow]
) -> tuple[list[tuple[schema.UserRow, Table, int]], list[RowError]]:
    """Returns (valid rows with their table and row number, one RowError per broken field)."""
    bad: list[RowError] = []
    valid: list[tuple[schema.UserRow, Table, int]] = []
    for table in tables:
        for offset, raw in enumerate(table.rows):
            number = table.first_row + offset
            data = {k: v for k, v in map_columns(raw, spec.columns).items() if v is not None}
            try:
                valid.append((model.model_validate(data), table, number))
            except ValidationError as err:
                for e in err.errors():
                    field_name, message = _friendly(e)
                    bad.append(RowError(table.label, number, field_name, message))
    return valid, bad


def _unique_records(
    name: str, spec: DatasetSpec, valid: list[tuple[schema.UserRow, Table, int]]
) -> tuple[list[Record], list[str]]:
    """Returns (a Record per first occurrence of each item, in order; one message per duplicate)."""
    from unisd.data.benchmarks import assign_split

    seen: dict[str, tuple[str, int]] = {}
    duplicates: list[str] = []
    records: list[Record] = []
    for row, table, number in valid:
        local = row.local_id()
        if local in seen:
            duplicates.append(_duplicate_message(row, local, table, number, seen[local]))
            continue
        seen[local] = (table.label, number)
        split = _split_of(row, table, spec, table.label) or assign_split(local)
        meta = {"source": table.label, "row": number, "dataset_source": spec.source}
        records.append(schema.to_record(row, dataset=name, split=split, meta=meta, metric=spec.metric))
    return records, duplicates


def _duplicate_message(
    row: schema.UserRow, local: str, table: Table, number: int, first: tuple[str, int]
) -> str:
    """Returns the message for row `number` repeating item `local` (`first`: the earlier label, row)."""
    first_label, first_row = first
    same = "row" if first_label == table.label else f"row of {first_label}"
    if row.id is not None:
        return f"{table.label}: row {number}: field 'id': duplicate id {local!r} (also {same} {first_row})"
    return (
        f"{table.label}: row {number}: the same {' and '.join(row.TASK_FIELDS)} as {same} "
        f"{first_row}; remove the duplicate, or give rows an id column"
    )


def _flat(values: Any) -> Iterator[str]:
    for v in values:
        yield from (v if isinstance(v, list) else [v])


def records_hash(records: Sequence[Record]) -> str:
    """sha256 of the records' canonical JSON (without meta.source: the same rows from another place hash
    the same)."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps(snapshot_row(r), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def snapshot_row(record: Record) -> dict[str, Any]:
    """A record as the prepare snapshot keeps it: everything but where it was read from."""
    row = record.to_dict()
    row["meta"] = {k: v for k, v in row["meta"].items() if k not in ("source", "dataset_source")}
    return row


# --------------------------------------------------------------------------------------------------
# Built-in benchmark files in object storage, and staging them there


def _cache_root() -> Path:
    env = os.environ.get("UNISD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("unisd"))


def fetch_file(uri: str) -> Path:
    """A local copy of one object-storage file, kept in the cache and downloaded again only when its
    version (ETag / md5 / generation) or size changed. Raises FileNotFoundError when it does not exist."""
    source = parse_source(uri)
    if source.scheme == "file":
        return Path(source.path)
    fs = _filesystem(source)
    with _storage_errors(source):
        info = fs.info(source.path)
    if info.get("type") == "directory":
        raise SourceError(f"{uri}: is a folder, not a file")
    version = {"size": info.get("size"), "version": _version(info)}
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = _cache_root() / "data" / key / Path(source.path).name
    stamp = local.with_name(local.name + ".version.json")
    if local.exists() and stamp.exists() and json.loads(stamp.read_text()) == version:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with _storage_errors(source):
            fs.get_file(source.path, tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp.write_text(json.dumps(version))
    log.info("fetched %s -> %s", uri, local)
    return local


def remote_is_dir(uri: str) -> bool:
    source = parse_source(uri)
    fs = _filesystem(source)
    with _storage_errors(source):
        return bool(fs.isdir(source.path))


def upload_files(local_dir: str | Path, relatives: Sequence[str], target: str) -> list[tuple[str, int]]:
    """Copy `local_dir/<relative>` to `target/<relative>` for every relative path: a local / volume
    folder (each file written to a temporary name, then renamed) or object storage (one PUT per file, so
    an object is whole or absent). Every file is checked to exist before anything is copied."""
    local_dir = Path(local_dir)
    missing = [r for r in relatives if not (local_dir / r).is_file()]
    if missing:
        raise FileNotFoundError(f"{local_dir}: missing {', '.join(missing)}; nothing was uploaded")
    source = parse_source(target)
    done = []
    if source.scheme == "file":
        root = Path(source.path)
        for r in relatives:
            dest = root / r
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.uploading")
            shutil.copyfile(local_dir / r, tmp)
            os.replace(tmp, dest)
            done.append((r, dest.stat().st_size))
        return done
    fs = _filesystem(source)
    with _storage_errors(source):
        for r in relatives:
            fs.put_file(str(local_dir / r), f"{source.path}/{r}")
            done.append((r, int(fs.info(f"{source.path}/{r}")["size"])))
    return done
