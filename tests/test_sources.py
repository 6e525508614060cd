"""User datasets (unisd.data.sources / schema, the free_form kind, `unisd data`): every format and source
kind read through `datasets` / fsspec, S3 through a real S3-compatible server (moto's server mode on
127.0.0.1), and every bad input answered with a message that names the source, row and field.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from s3_server import S3Server, clear_fsspec_cache

from unisd.data import schema
from unisd.data.sources import (
    DatasetError,
    DatasetSpec,
    SourceError,
    dataset_name,
    load_dataset_records,
    records_hash,
    source_fingerprint,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"

MC_ROWS = [
    {
        "id": f"q{i}",
        "question": f"Question {i}?",
        "choices": ["red", "green", "blue", "grey"],
        "answer": "ABCD"[i % 4],
    }
    for i in range(1, 21)
]
FF_ROWS = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(1, 21)]


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def load(source, **spec) -> object:
    return load_dataset_records(spec.pop("name", "ds"), DatasetSpec(source=str(source), **spec))


@pytest.fixture(scope="module")
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    yield s3_server.use(monkeypatch)
    clear_fsspec_cache()


# --------------------------------------------------------------------------------------------------
# The schema


def test_json_schema_files_are_current():
    for name, generated in schema.json_schemas().items():
        path = REPO / "docs" / "schemas" / name
        assert path.exists(), f"missing {path}: write it from unisd.data.schema.json_schemas()"
        assert json.loads(path.read_text()) == generated, f"{path} is stale"
    assert sorted(schema.KINDS) == ["code", "free_form", "multiple_choice", "tool_use"]


def test_each_kind_becomes_records_the_task_kind_accepts():
    from unisd import tasks

    for kind, file, columns in [
        ("multiple_choice", "support_tickets.jsonl", {"id": "ticket_id", "question": "ticket", "choices": "options", "answer": "label", "explanation": "why"}),
        ("free_form", "general_faq.csv", {"prompt": "question", "answer": "reference", "explanation": "rationale"}),
        ("code", "python_functions.jsonl", {}),
        ("tool_use", "assistant_tools.jsonl", {}),
    ]:  # fmt: skip
        ds = load(EXAMPLES / file, kind=kind, columns=columns, name="ex")
        assert ds.kind == kind and ds.records and not ds.bad_rows
        assert 24 <= ds.rows_read <= 40  # "a few dozen rows each"
        for rec in ds.records:
            assert rec.task_kind == kind and rec.benchmark == "ex" and rec.id.startswith("ex/")
            tasks.of(rec).validate(rec)
            assert tasks.of(rec).gold_completion(rec).strip()


def test_multiple_choice_answer_forms_and_the_seeded_split(tmp_path):
    from unisd.data.benchmarks import assign_split

    rows = [
        {"question": "a?", "choices": ["x", "y", "z"], "answer": "b"},
        {"question": "b?", "choices": ["x", "y", "z"], "answer": 2},
        {"question": "c?", "choices": ["x", "y", "z"], "answer": "x"},
        {"question": "d?", "choices": ["x", "y", "z"], "answer": "1", "split": "dev"},
    ]
    ds = load(write_jsonl(tmp_path / "mc.jsonl", rows))
    assert [r.answer for r in ds.records] == ["B", "C", "A", "B"]
    first = schema.MultipleChoiceRow.model_validate(rows[0])
    assert ds.records[0].split == assign_split(first.content_id())  # the built-ins' seeded rule, by row id
    assert ds.records[3].split == "validation"
    assert ds.records[0].reference == "Answer: B"


def test_kind_is_inferred_from_the_columns():
    assert schema.infer_kind({"question", "choices", "answer"}) == "multiple_choice"
    assert schema.infer_kind({"prompt", "tests", "entry_point"}) == "code"
    assert schema.infer_kind({"tools", "request", "gold_calls"}) == "tool_use"
    assert schema.infer_kind({"prompt", "answer"}) == "free_form"
    with pytest.raises(ValueError, match="cannot tell the task kind"):
        schema.infer_kind({"text", "label"})


def test_dataset_names_of_sources():
    assert dataset_name("s3://team/support.jsonl") == "support"
    assert dataset_name("gs://b/dir/Support Tickets.v2.csv") == "support-tickets-v2"
    assert dataset_name("hf://org/MyData:main") == "mydata-main"
    assert dataset_name("/mnt/volume/faq/") == "faq"
    assert dataset_name("mbpp") == "mbpp"


# --------------------------------------------------------------------------------------------------
# Formats and local sources


def test_jsonl_json_csv_parquet_and_a_folder_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = FF_ROWS[:6]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    expected = [(r["prompt"], r["answer"]) for r in rows]
    for name, extra in [
        ("a.jsonl", {}),
        ("b.json", {}),
        ("c.json", {"field": "data"}),
        ("d.csv", {}),
        ("e.parquet", {}),
    ]:
        ds = load(tmp_path / name, **extra)
        assert ds.kind == "free_form" and [(r.question, r.answer) for r in ds.records] == expected, name
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part1.jsonl", FF_ROWS[:3])
    pq.write_table(pa.Table.from_pylist(FF_ROWS[3:7]), folder / "part2.parquet")
    (folder / "README.md").write_text("not data")
    ds = load(folder)
    assert len(ds.records) == 7
    assert ds.records[3].meta["source"].endswith("part2.parquet") and ds.records[3].meta["row"] == 1


def test_csv_list_fields_and_column_lists(tmp_path):
    path = tmp_path / "mmlu_style.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["q", "A", "B", "C", "target"])
        writer.writerow(["Largest planet?", "Mars", "Jupiter", "Venus", "B"])
        writer.writerow(["Smallest planet?", "Mercury", "Earth", "Saturn", "A"])
    ds = load(
        path,
        kind="multiple_choice",
        columns={"question": "q", "choices": ["A", "B", "C"], "answer": "target"},
    )
    assert [r.choices for r in ds.records][0] == ["Mars", "Jupiter", "Venus"]
    path2 = tmp_path / "json_cells.csv"
    path2.write_text('question,choices,answer\nWhere?,"[""sea"",""sky""]",A\n')
    assert load(path2).records[0].choices == ["sea", "sky"]


def test_a_saved_datasets_folder_with_and_without_splits(tmp_path):
    import datasets

    datasets.Dataset.from_list(MC_ROWS).save_to_disk(str(tmp_path / "plain"))
    ds = load(tmp_path / "plain")
    assert ds.kind == "multiple_choice" and len(ds.records) == 20
    assert set(ds.split_counts()) == {"train", "validation", "test"}  # seeded
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(MC_ROWS[:12]), "test": datasets.Dataset.from_list(MC_ROWS[12:])}
    ).save_to_disk(str(tmp_path / "dict"))
    ds = load(tmp_path / "dict")
    assert ds.split_counts() == {"train": 12, "validation": 0, "test": 8}
    datasets.DatasetDict({"holdout": datasets.Dataset.from_list(MC_ROWS)}).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(SourceError, match=r"split named 'holdout'; map it with splits: \{holdout: train"):
        load(tmp_path / "odd")
    assert load(tmp_path / "odd", splits={"holdout": "test"}).split_counts()["test"] == 20
    assert sum(load(tmp_path / "odd", splits={"holdout": "seeded"}).split_counts().values()) == 20


def test_hub_source_goes_through_datasets_load_dataset(monkeypatch):
    """No Hub here: check that hf://org/name:config reaches datasets.load_dataset with the right arguments
    and that its DatasetDict splits become record splits."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(FF_ROWS[:5]),
                "validation": datasets.Dataset.from_list(FF_ROWS[5:8]),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load("hf://acme/qa-pairs:en", revision="v1.0", name="qa")
    assert calls == [("acme/qa-pairs", "en", {"revision": "v1.0"})]
    assert ds.split_counts() == {"train": 5, "validation": 3, "test": 0}
    with pytest.raises(DatasetError, match="the test split has no rows"):
        ds.rows("test")


# --------------------------------------------------------------------------------------------------
# Object storage (a real S3-compatible server)


def test_s3_file_folder_and_saved_dataset(s3, tmp_path):
    import datasets

    uri = s3.put("team/support.jsonl", "".join(json.dumps(r) + "\n" for r in MC_ROWS))
    ds = load(uri, name="support")
    assert ds.kind == "multiple_choice" and len(ds.records) == 20
    assert ds.records[0].meta["source"] == "s3://team/support.jsonl"
    s3.put("team/faq/a.jsonl", "".join(json.dumps(r) + "\n" for r in FF_ROWS[:10]))
    s3.put("team/faq/b.jsonl", "".join(json.dumps(r) + "\n" for r in FF_ROWS[10:]))
    assert len(load("s3://team/faq/", name="faq").records) == 20
    datasets.Dataset.from_list(MC_ROWS).save_to_disk(str(tmp_path / "saved"))
    s3.fs().put(str(tmp_path / "saved"), "team/saved", recursive=True)
    assert len(load("s3://team/saved", name="saved").records) == 20


def test_s3_fingerprint_is_cheap_and_follows_the_content(s3):
    uri = s3.put("fpbucket/data.jsonl", json.dumps(FF_ROWS[0]) + "\n")
    files, first = source_fingerprint(DatasetSpec(source=uri))
    assert files == [] and first["files"][0][2]  # an ETag, no download
    assert source_fingerprint(DatasetSpec(source=uri))[1] == first
    s3.put("fpbucket/data.jsonl", json.dumps(FF_ROWS[1]) + "\n")
    assert source_fingerprint(DatasetSpec(source=uri))[1] != first


def test_prepare_snapshots_user_data_and_reruns_only_when_the_source_changes(s3, tmp_path):
    from unisd.prepare import PrepareConfig, run_prepare

    s3.put("team/quiz.jsonl", "".join(json.dumps(r) + "\n" for r in MC_ROWS))
    s3.put("team/sums.jsonl", "".join(json.dumps(r) + "\n" for r in FF_ROWS))
    cfg = PrepareConfig(
        benchmarks=["quiz", "s3://team/sums.jsonl"],
        datasets={"quiz": {"source": "s3://team/quiz.jsonl", "kind": "multiple_choice"}},
        max_prompt_tokens=512,
        max_teacher_prompt_tokens=512,
    )
    out = tmp_path / "prepared"
    first = run_prepare(cfg, model_spec="tiny:llama", out_dir=out)
    assert set(first["counts"]["eval"]) == {"quiz", "sums"}
    snapshot = json.loads((out / "snapshot" / "sources.json").read_text())
    assert snapshot["quiz"]["kind"] == "multiple_choice" and snapshot["sums"]["kind"] == "free_form"
    rows = [json.loads(line) for line in (out / "snapshot" / "quiz.jsonl").read_text().splitlines()]
    assert len(rows) == snapshot["quiz"]["rows_used"] and 0 < len(rows) < 20  # train + test, no validation
    assert all("source" not in r["meta"] for r in rows)
    written = (out / "train.jsonl").stat().st_mtime_ns
    again = run_prepare(cfg, model_spec="tiny:llama", out_dir=out)
    assert again["inputs_hash"] == first["inputs_hash"]
    assert (out / "train.jsonl").stat().st_mtime_ns == written  # skipped: unchanged source, nothing rewritten
    changed = [dict(r, question=r["question"] + " (v2)") if r["id"] == "q1" else r for r in MC_ROWS]
    s3.put("team/quiz.jsonl", "".join(json.dumps(r) + "\n" for r in changed))
    third = run_prepare(cfg, model_spec="tiny:llama", out_dir=out)
    assert third["counts"]["data_hash"] != first["counts"]["data_hash"]  # a changed source: a new data hash


# --------------------------------------------------------------------------------------------------
# Bad input: every case names what to fix


BAD_MC = dict(MC_ROWS[0], answer="E")


@pytest.mark.parametrize(
    ("case", "rows", "spec", "message"),
    [
        (
            "answer outside the choices",
            [*MC_ROWS[:16], dict(MC_ROWS[16], answer="E")],
            {},
            "support.jsonl: row 17: field 'answer': 'E' is not one of the 4 choices (A, B, C, D)",
        ),
        (
            "missing field",
            [{"question": "q?", "choices": ["a", "b"]}],
            {},
            "row 1: field 'answer': is missing",
        ),
        (
            "wrong type",
            [{"question": ["q?"], "choices": ["a", "b"], "answer": "A"}],
            {},
            "row 1: field 'question': must be text, got list ['q?']",
        ),
        (
            "one choice",
            [{"question": "q", "choices": ["a"], "answer": "A"}],
            {},
            "must have at least 2 items",
        ),
        (
            "duplicate ids",
            [MC_ROWS[0], dict(MC_ROWS[1], id="q1")],
            {},
            "support.jsonl: row 2: field 'id': duplicate id 'q1' (also row 1)",
        ),
        (
            "duplicate rows without ids",
            [FF_ROWS[0], FF_ROWS[1], FF_ROWS[0]],
            {},
            "row 3: the same prompt as row 1; remove the duplicate, or give rows an id column",
        ),
        (
            "a bad split value",
            [dict(MC_ROWS[0], split="holdout")],
            {},
            "field 'split': 'holdout' is not a split",
        ),
        (
            "code that does not parse",
            [{"prompt": "p", "entry_point": "f", "tests": ["assert f(1) == 2", "assert f(("]}],
            {},
            "field 'tests': test 1 is not valid Python",
        ),
        (
            "a solution without the entry point",
            [
                {
                    "prompt": "p",
                    "entry_point": "f",
                    "tests": ["assert f(1)"],
                    "reference_solution": "def g(x):\n    return x",
                }
            ],
            {},
            "field 'reference_solution': does not define the entry point f()",
        ),
        (
            "a tool call without a name",
            [{"tools": "t: does t", "request": "r", "gold_calls": [{"arguments": {}}]}],
            {},
            "field 'gold_calls[0].name': is missing",
        ),
        (
            "a mapping to a column the table lacks",
            [{"q": "x", "options": ["a", "b"], "label": "A"}],
            {
                "kind": "multiple_choice",
                "columns": {"question": "q", "choices": "options", "answer": "correct"},
            },
            "columns maps 'answer' to 'correct', but the table has no column 'correct'",
        ),
        (
            "columns no kind explains",
            [{"text": "x", "label": 1}],
            {},
            "cannot tell the task kind from the columns",
        ),
        ("not a JSON object", ["[1, 2]"], {}, "line 1: a JSON list, where a row object is expected"),
        ("not JSON", ['{"question": "q", "choices": '], {}, "line 1: not valid JSON (Expecting value"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_bad_rows_name_source_row_and_field(tmp_path, case, rows, spec, message):
    path = write_jsonl(tmp_path / "support.jsonl", rows)
    with pytest.raises((DatasetError, SourceError, ValueError)) as info:
        load(path, name="support", **spec)
    assert message in str(info.value), str(info.value)


def test_max_bad_rows_skips_and_reports(tmp_path):
    rows = [*MC_ROWS[:10], BAD_MC, dict(MC_ROWS[10], choices="not a list")]
    path = write_jsonl(tmp_path / "support.jsonl", rows)
    with pytest.raises(
        DatasetError, match=r"2 of 12 rows break the multiple_choice schema \(max_bad_rows 0\)"
    ):
        load(path)
    with pytest.raises(DatasetError, match="max_bad_rows 1"):
        load(path, max_bad_rows=1)
    ds = load(path, max_bad_rows=2)
    assert len(ds.records) == 10 and [e.row for e in ds.bad_rows] == [11, 12]  # one error each


def test_file_level_problems(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SourceError, match=r"empty.jsonl: no rows \(the file is empty\)"):
        load(tmp_path / "empty.jsonl")
    (tmp_path / "header.csv").write_text("prompt,answer\n")
    with pytest.raises(SourceError, match="no rows"):
        load(tmp_path / "header.csv")
    (tmp_path / "latin1.jsonl").write_bytes(
        (json.dumps(FF_ROWS[0]) + "\n").encode() + '{"prompt": "caf\xe9?", "answer": "x"}\n'.encode("latin-1")
    )
    with pytest.raises(
        SourceError,
        match=r"latin1.jsonl: line 2: not valid UTF-8 \(byte 0xE9 at offset \d+\); save the file as UTF-8",
    ):
        load(tmp_path / "latin1.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file or folder"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="holds no .csv, .json, .jsonl"):
        load(tmp_path / "d")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match="bad.parquet: not a valid Parquet file"):
        load(tmp_path / "bad.parquet")


def test_credentials_never_in_the_config():
    with pytest.raises(ValueError, match=r"\['secret'\] look like credentials.*environment"):
        DatasetSpec(source="s3://b/k.jsonl", secret="abc")
    with pytest.raises(ValueError, match="the URI holds credentials"):
        DatasetSpec(source="s3://AKIA:abc@bucket/k.jsonl")
    with pytest.raises(ValueError, match="unsupported scheme ftp://"):
        DatasetSpec(source="ftp://host/k.jsonl")
    with pytest.raises(SourceError, match=r"gs://b/k.jsonl: reading gs:// needs the package gcsfs"):
        load("gs://b/k.jsonl")


@pytest.mark.parametrize(
    "prepare",
    [
        {"benchmarks": ["t"], "datasets": {"t": {"source": "s3://b/k.jsonl", "secret": "topsecret"}}},
        {"benchmarks": ["t"], "datasets": {"t": {"source": "s3://AKIA:topsecret@b/k.jsonl"}}},
        {"benchmarks": ["s3://AKIA:topsecret@b/k.jsonl"]},
        {"benchmarks": ["mbpp"], "eval_only": ["gs://user:topsecret@b/k.jsonl"]},
    ],
)
def test_a_refused_secret_is_not_echoed(prepare):
    """Config errors print their input: the secret is masked before the config is refused."""
    from unisd.config import ConfigError, validate
    from unisd.runconfig import RunConfig

    with pytest.raises(ConfigError) as info:
        validate(RunConfig, {"prepare": prepare}, source="run.yaml")
    assert "credentials" in str(info.value) and "topsecret" not in str(info.value)


def test_s3_missing_object_credentials_and_endpoint(s3, monkeypatch):
    s3.put("there/x.jsonl", json.dumps(FF_ROWS[0]) + "\n")
    with pytest.raises(FileNotFoundError, match="s3://there/missing.jsonl: does not exist"):
        load("s3://there/missing.jsonl")
    with pytest.raises(FileNotFoundError, match="s3://nobucket/x.jsonl: does not exist"):
        load("s3://nobucket/x.jsonl")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    clear_fsspec_cache()
    with pytest.raises(
        SourceError, match="s3://there/x.jsonl: no credentials found for s3://. Set AWS_ACCESS_KEY_ID"
    ):
        load("s3://there/x.jsonl")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    from mlflow_server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    clear_fsspec_cache()
    with pytest.raises(
        SourceError, match=r"s3://there/x.jsonl: cannot reach the storage endpoint http://127.0.0.1:\d+"
    ):
        load("s3://there/x.jsonl")


# --------------------------------------------------------------------------------------------------
# The free_form kind


def test_free_form_scores_with_the_metric_libraries():
    from unisd.data.records import Record
    from unisd.tasks import free_form

    rec = Record("f/1", "f", "test", "Capital of France?", "Answer: Paris", "Paris", task_kind="free_form")
    out = free_form.score([rec, rec], [["Reasoning: it is.\nAnswer: Paris"], ["Answer: Lyon"]])
    assert out["metric"] == "rougeL"
    assert [r["score"] for r in out["per_item"]] == [1.0, 0.0] and out["per_item"][0]["predicted"] == "Paris"
    assert out["aggregate"]["mean_exact_match"] == 0.5
    scores = free_form.metric_scores("the capital is Paris", "Paris is the capital")
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(
        "Paris is the capital", "the capital is Paris"
    )
    assert scores["rougeL"] == pytest.approx(expected["rougeL"].fmeasure) and 0 < scores["chrf"] < 1
    chrf = Record(
        "f/2", "f", "test", "q", "Answer: Paris", "Paris", meta={"metric": "chrf"}, task_kind="free_form"
    )
    assert free_form.score([chrf], [["Answer: Pariss"]])["metric"] == "chrf"


def test_free_form_negatives_are_judged_by_the_metric():
    from types import SimpleNamespace

    from unisd.data.records import Record
    from unisd.tasks import free_form

    rec = Record(
        "f/1", "f", "train", "Who wrote Hamlet?", "Answer: William Shakespeare", "William Shakespeare",
        meta={"wrong_answers": ["Christopher Marlowe"]}, task_kind="free_form",
    )  # fmt: skip
    cfg = SimpleNamespace(seed=0)
    assert free_form.judge_negative(rec, "", "Christopher Marlowe", "", cfg)["valid"] is True
    verdict = free_form.judge_negative(rec, "", "william shakespeare", "", cfg)
    assert not verdict.get("valid") and verdict["why"] == "matches the reference answer"
    assert "too close" in free_form.judge_negative(rec, "", "Shakespeare, William", "", cfg)["why"]
    fallback = free_form.fallback_negative(rec, cfg)
    assert fallback == {
        "text": "Answer: Christopher Marlowe",
        "answer": "Christopher Marlowe",
        "validated": True,
        "how": "wrong_answers",
    }
    plain = Record("f/2", "f", "train", "2+2?", "Answer: 4", "4", task_kind="free_form")
    assert free_form.fallback_negative(plain, cfg)["how"] == "non-answer"
    assert len(set(free_form.negative_strategies(rec, 4, 0))) == 4


# --------------------------------------------------------------------------------------------------
# The command line


def test_cli_validate_show_and_upload(tmp_path, capsys, s3):
    from unisd.cli import main

    rows = [*MC_ROWS[:16], dict(MC_ROWS[16], answer="E"), *MC_ROWS[17:]]
    path = write_jsonl(tmp_path / "support.jsonl", rows)
    assert main(["data", "validate", str(path), "--kind", "multiple_choice"]) == 2
    out = capsys.readouterr()
    assert "rows:     20 read, 19 valid, 1 bad (max_bad_rows 0)" in out.out
    assert "support.jsonl: row 17: field 'answer': 'E' is not one of the 4 choices (A, B, C, D)" in out.out
    assert "refused" in out.err
    assert main(["data", "validate", str(path), "--max-bad-rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "splits:   train" in out and "ok (1 bad row(s) will be skipped)" in out
    mapped = write_jsonl(tmp_path / "tickets.jsonl", [{"ticket": "t?", "opts": ["a", "b"], "label": "B"}] * 1)
    assert (
        main(["data", "validate", str(mapped), "--columns", "question=ticket,choices=opts,answer=label"]) == 0
    )
    assert (
        main(
            [
                "data",
                "show",
                str(EXAMPLES / "general_faq.csv"),
                "--columns",
                "prompt=question,answer=reference",
                "--rows",
                "1",
            ]
        )
        == 0
    )
    assert "--- student prompt ---" in capsys.readouterr().out
    # upload: stages the built-ins' files (and licences) into a bucket; nothing when a file is missing
    src = tmp_path / "data"
    write_jsonl(src / "mbpp" / "mbpp.jsonl", [{"x": 1}])
    (src / "mbpp" / "LICENSE.mbpp").write_text("CC BY 4.0")
    assert main(["data", "upload", str(src), "s3://staging/unisd-data", "--only", "mbpp"]) == 2
    assert (
        "s3://staging/unisd-data: does not exist (The specified bucket does not exist)"
        in capsys.readouterr().err
    )
    s3.fs().mkdir("staging")
    assert main(["data", "upload", str(src), "s3://staging/unisd-data"]) == 2
    assert "missing" in capsys.readouterr().err and not s3.fs().exists("staging/unisd-data/mbpp/mbpp.jsonl")
    assert main(["data", "upload", str(src), "s3://staging/unisd-data", "--only", "mbpp"]) == 0
    assert sorted(s3.fs().find("staging/unisd-data")) == [
        "staging/unisd-data/mbpp/LICENSE.mbpp",
        "staging/unisd-data/mbpp/mbpp.jsonl",
    ]


def test_records_hash_ignores_where_rows_came_from(tmp_path):
    write_jsonl(tmp_path / "a" / "quiz.jsonl", MC_ROWS)
    write_jsonl(tmp_path / "b" / "quiz.jsonl", MC_ROWS)
    first, second = load(tmp_path / "a" / "quiz.jsonl"), load(tmp_path / "b" / "quiz.jsonl")
    assert records_hash(first.records) == records_hash(second.records)


def test_prepare_reruns_when_a_local_file_changes_and_refuses_before_writing(tmp_path):
    from unisd.prepare import PrepareConfig, run_prepare

    path = write_jsonl(tmp_path / "sums.jsonl", FF_ROWS)
    cfg = PrepareConfig(benchmarks=[str(path)], max_prompt_tokens=512, max_teacher_prompt_tokens=512)
    out = tmp_path / "prepared"
    first = run_prepare(cfg, model_spec="tiny:llama", out_dir=out)
    written = (out / "train.jsonl").stat().st_mtime_ns
    assert run_prepare(cfg, model_spec="tiny:llama", out_dir=out)["inputs_hash"] == first["inputs_hash"]
    assert (out / "train.jsonl").stat().st_mtime_ns == written  # skipped: nothing rewritten
    write_jsonl(path, [*FF_ROWS, {"prompt": "What is 0 plus 0?", "answer": "0"}])
    second = run_prepare(cfg, model_spec="tiny:llama", out_dir=out)
    assert second["inputs_hash"] != first["inputs_hash"]
    assert second["counts"]["data_hash"] != first["counts"]["data_hash"]
    write_jsonl(path, [*FF_ROWS, {"prompt": "What is 0 plus 0?"}])  # a bad row: refused, nothing written
    fresh = tmp_path / "fresh"
    with pytest.raises(DatasetError, match="row 21: field 'answer': is missing"):
        run_prepare(cfg, model_spec="tiny:llama", out_dir=fresh)
    assert not fresh.exists() or not any(fresh.iterdir())
