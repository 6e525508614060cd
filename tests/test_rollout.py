from __future__ import annotations

import json

import pytest

from unisd.artifacts import read_jsonl, write_jsonl
from unisd.models import tiny_model
from unisd.rollout import (
    PARTIAL_KEY,
    RolloutConfig,
    generate_continuous,
    generate_hf,
    generate_pruned,
    generate_static,
    rollout_stage,
    run_rollout,
    shard_range,
)
from unisd.scoring import _score_rows_plain


class _Tok:
    """Minimal tokenizer surface generate_hf and run_rollout use (ids are already tokens here)."""

    pad_token_id = 0
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.mark.parametrize("n,shards", [(0, 1), (1, 3), (10, 3), (11, 4), (32, 32)])
def test_shard_ranges_cover_every_item_once(n, shards):
    covered = []
    for s in range(shards):
        a, b = shard_range(n, shards, s)
        covered.extend(range(a, b))
    assert covered == list(range(n))
    with pytest.raises(ValueError):
        shard_range(n, shards, shards)


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", vocab_size=64, seed=2)
    m.generation_config.eos_token_id = 2
    return m


def test_batched_greedy_equals_one_by_one_and_logps_match_teacher_forcing(model):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    cfg = RolloutConfig(temperature=0.0, max_new_tokens=6, batch_size=3)
    batched = generate_hf(model, _Tok(), prompts, cfg)
    for p, (ids, finished, logps) in zip(prompts, batched):
        alone = generate_hf(model, _Tok(), [p], cfg)[0]
        assert ids == alone[0]
        assert finished == (2 in ids) and (not finished or ids[-1] == 2)
        assert len(logps) == len(ids)
        # The rollout's own log-probs equal a teacher-forced re-score: staleness ≈ 0 for the HF backend.
        rescored = _score_rows_plain(model, [p], [ids], pad_id=0, chunk_size=4)[0][0]
        assert logps == pytest.approx(rescored, abs=1e-4)


def test_sampling_is_seeded(model):
    prompts = [[5, 6, 7], [8, 9, 10]]
    cfg = RolloutConfig(temperature=1.0, max_new_tokens=8, seed=7)
    assert generate_hf(model, _Tok(), prompts, cfg) == generate_hf(model, _Tok(), prompts, cfg)
    other = generate_hf(model, _Tok(), prompts, cfg.model_copy(update={"seed": 8}))
    assert other != generate_hf(model, _Tok(), prompts, cfg)


def test_run_rollout_shards_and_resumes_from_partial(model, tmp_path):
    prepared = tmp_path / "prepared"
    rows = [
        {"id": f"x/{i}", "student_prompt_ids": [5 + i, 6, 7], "teacher_prompt_ids": [1]} for i in range(7)
    ]
    write_jsonl(prepared / "train.jsonl", rows)
    cfg = RolloutConfig(
        backend="hf", temperature=0.0, max_new_tokens=4, batch_size=2, num_shards=2, shard_index=1
    )
    out = tmp_path / "shard1"
    out.mkdir()
    # A previous, killed run with these settings finished item x/4 (with a marker text we can recognise).
    (out / "partial.jsonl").write_text(
        json.dumps({"id": "x/4", "completion_ids": [9], "text": "KEPT", "finished": False, "logps": [-1.0]})
        + "\n"
    )
    key = rollout_stage(cfg, "tiny:llama", prepared / "train.jsonl", out).inputs_hash
    (out / PARTIAL_KEY).write_text(key + "\n")
    manifest = run_rollout(
        cfg, model_spec="tiny:llama", prepared_dir=prepared, out_dir=out, model=model, tokenizer=_Tok()
    )
    done = read_jsonl(out / "completions.jsonl")
    assert [r["id"] for r in done] == ["x/4", "x/5", "x/6"]  # shard 1 of 2 over 7 items = [4, 7)
    assert done[0]["text"] == "KEPT"
    assert manifest["counts"]["items"] == 3 and not (out / "partial.jsonl").exists()
    # A finished shard with the same inputs is skipped, not regenerated.
    again = run_rollout(
        cfg, model_spec="tiny:llama", prepared_dir=prepared, out_dir=out, model=None, tokenizer=_Tok()
    )
    assert again["finished_at"] == manifest["finished_at"]


def test_partial_rollout_from_other_settings_is_discarded_not_mixed(model, tmp_path):
    """Killed with max_new_tokens=150, rerun with 4: the old rows are not reused (they would be mixed into a
    manifest that says 4)."""
    prepared = tmp_path / "prepared"
    rows = [{"id": f"x/{i}", "student_prompt_ids": [5 + i, 6], "teacher_prompt_ids": [1]} for i in range(3)]
    write_jsonl(prepared / "train.jsonl", rows)
    old = RolloutConfig(backend="hf", temperature=0.0, max_new_tokens=150, batch_size=2)
    out = tmp_path / "out"
    out.mkdir()
    stale = {
        "id": "x/0",
        "completion_ids": [9] * 150,
        "text": "OLD",
        "finished": False,
        "logps": [-1.0] * 150,
    }
    (out / "partial.jsonl").write_text(json.dumps(stale) + "\n")
    (out / PARTIAL_KEY).write_text(
        rollout_stage(old, "tiny:llama", prepared / "train.jsonl", out).inputs_hash + "\n"
    )
    new = old.model_copy(update={"max_new_tokens": 4})
    run_rollout(
        new, model_spec="tiny:llama", prepared_dir=prepared, out_dir=out, model=model, tokenizer=_Tok()
    )
    done = read_jsonl(out / "completions.jsonl")
    assert all(r["text"] != "OLD" and len(r["completion_ids"]) <= 4 for r in done)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_pruned_decode_equals_hf_generate_greedy_and_its_logps_are_exact(arch):
    """Rows leave the batch when they end, yet every row gets HF generate's greedy tokens, and the recorded
    log-probs equal a teacher-forced re-score (staleness ≈ 0): the faster path changes nothing it returns."""
    model = tiny_model(arch, vocab_size=64, seed=3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [10, 11], [12, 13, 14], [20, 21, 22, 23], [30]]
    cfg = RolloutConfig(temperature=0.0, max_new_tokens=12)

    class Tok(_Tok):
        eos_token_id = 63

    model.generation_config.eos_token_id = 63
    # EOS := the third token the first row writes, so that row ends early and the others (likely) later.
    first_row = generate_hf(model, Tok(), prompts, cfg)[0][0]
    Tok.eos_token_id = model.generation_config.eos_token_id = first_row[min(2, len(first_row) - 1)]
    hf = generate_hf(model, Tok(), prompts, cfg)
    pruned = generate_pruned(model, Tok(), prompts, cfg)
    assert [r[0] for r in pruned] == [r[0] for r in hf] and [r[1] for r in pruned] == [r[1] for r in hf]
    lengths = {len(ids) for ids, _, _ in pruned}
    assert len(lengths) > 1  # rows really finished at different steps
    for p, (ids, _, logps) in zip(prompts, pruned):
        rescored = _score_rows_plain(model, [p], [ids], pad_id=0, chunk_size=4)[0][0]
        assert logps == pytest.approx(rescored, abs=1e-4)
    sampled = RolloutConfig(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=5)
    first, second = (
        generate_pruned(model, Tok(), prompts, sampled),
        generate_pruned(model, Tok(), prompts, sampled),
    )
    assert first == second  # seeded
    for p, (ids, _, logps) in zip(prompts, first):  # temperature-1 log-probs of the sampled tokens, exact
        rescored = _score_rows_plain(model, [p], [ids], pad_id=0, chunk_size=4)[0][0]
        assert logps == pytest.approx(rescored, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_continuous_decode_refills_rows_yet_equals_hf_generate_and_its_logps_are_exact(arch):
    """Two rows in flight for seven prompts of mixed lengths: finished rows leave, waiting prompts are
    prefilled (bucketed by length) and join with their KV left-padded into the batch, and every row still
    gets HF generate's greedy tokens and log-probs equal to a teacher-forced re-score."""
    model = tiny_model(arch, vocab_size=64, seed=3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [10, 11], [12, 13, 14], [20, 21, 22, 23], [30], [31, 32], [1] * 9]
    cfg = RolloutConfig(temperature=0.0, max_new_tokens=12, batch_size=2, decode="continuous")

    class Tok(_Tok):
        eos_token_id = 63

    model.generation_config.eos_token_id = 63
    first_row = generate_hf(model, Tok(), prompts, cfg)[0][0]
    Tok.eos_token_id = model.generation_config.eos_token_id = first_row[min(2, len(first_row) - 1)]
    hf = [generate_hf(model, Tok(), [p], cfg)[0] for p in prompts]  # one by one: no padding at all
    continuous = generate_continuous(model, Tok(), prompts, cfg)
    assert [r[0] for r in continuous] == [r[0] for r in hf] and [r[1] for r in continuous] == [
        r[1] for r in hf
    ]
    assert len({len(ids) for ids, _, _ in continuous}) > 1  # rows really finished at different steps
    for p, (ids, _, logps) in zip(prompts, continuous):
        rescored = _score_rows_plain(model, [p], [ids], pad_id=0, chunk_size=4)[0][0]
        assert logps == pytest.approx(rescored, abs=1e-4)
    sampled = RolloutConfig(
        temperature=0.8, top_p=0.9, max_new_tokens=10, seed=5, batch_size=2, decode="continuous"
    )
    first = generate_continuous(model, Tok(), prompts, sampled)
    assert first == generate_continuous(model, Tok(), prompts, sampled)  # seeded
    # each row draws from its own generator: the same samples with every prompt in flight at once
    wide = generate_continuous(model, Tok(), prompts, sampled.model_copy(update={"batch_size": 7}))
    assert [r[0] for r in wide] == [r[0] for r in first]
    for p, (ids, _, logps) in zip(prompts, first):
        rescored = _score_rows_plain(model, [p], [ids], pad_id=0, chunk_size=4)[0][0]
        assert logps == pytest.approx(rescored, abs=1e-4)


def test_continuous_decode_refuses_a_sliding_window_cache():
    model = tiny_model("gemma3", vocab_size=64, seed=3)
    cfg = RolloutConfig(temperature=0.0, max_new_tokens=4, batch_size=2, decode="continuous")
    with pytest.raises(ValueError, match="use decode: pruned"):
        generate_continuous(model, _Tok(), [[5, 6, 7], [8, 9]], cfg)


def test_static_cache_compiled_decode_equals_hf_generate_and_its_logps_are_exact():
    """decode=static (a static KV cache, the decode step compiled; padded to a width bucket and a full batch):
    HF generate's greedy tokens for every row, and log-probs equal to a teacher-forced re-score."""
    model = tiny_model("llama", vocab_size=64, seed=3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [10, 11], [12, 13, 14]]  # 3 rows of a batch of 4: one filler row
    cfg = RolloutConfig(temperature=0.0, max_new_tokens=8, batch_size=4, decode="static")
    from torch._dynamo.utils import counters

    hf = generate_hf(model, _Tok(), prompts, cfg)
    counters.clear()
    static = generate_static(model, _Tok(), prompts, cfg)
    assert counters["stats"]["unique_graphs"] == 1  # the decode step really ran compiled
    assert len(static) == 3 and [r[0] for r in static] == [r[0] for r in hf]
    for p, (ids, _, logps) in zip(prompts, static):
        rescored = _score_rows_plain(model, [p], [ids], pad_id=0, chunk_size=4)[0][0]
        assert logps == pytest.approx(rescored, abs=1e-4)
    sampled = cfg.model_copy(update={"temperature": 0.8, "seed": 5})
    first = generate_static(model, _Tok(), [p[:2] for p in prompts], sampled)
    assert counters["stats"]["unique_graphs"] == 1  # another width in the same bucket: no recompile
    for p, (ids, _, logps) in zip([p[:2] for p in prompts], first):  # temperature-1 log-probs, exact
        rescored = _score_rows_plain(model, [p], [ids], pad_id=0, chunk_size=4)[0][0]
        assert logps == pytest.approx(rescored, abs=1e-4)


def test_rollout_in_bfloat16_records_the_bf16_samplers_logps(tmp_path):
    """rollout.dtype=bfloat16 decodes with bf16 weights: the recorded log-probs are that sampler's (close to
    the fp32 trainer's re-score, and not equal to it: the staleness scoring reports is the precision gap)."""
    from unisd.models import load_model

    prepared = tmp_path / "prepared"
    write_jsonl(
        prepared / "train.jsonl",
        [
            {"id": f"x/{i}", "student_prompt_ids": [5 + i, 6, 7, 8], "teacher_prompt_ids": [1]}
            for i in range(3)
        ],
    )
    cfg = RolloutConfig(backend="hf", temperature=0.0, max_new_tokens=6, batch_size=3, dtype="bfloat16")
    run_rollout(
        cfg, model_spec="tiny:llama", prepared_dir=prepared, out_dir=tmp_path / "out", tokenizer=_Tok()
    )
    rows = read_jsonl(tmp_path / "out" / "completions.jsonl")
    fp32 = load_model("tiny:llama", dtype="float32")
    gaps = []
    for i, row in enumerate(rows):
        rescored = _score_rows_plain(
            fp32, [[5 + i, 6, 7, 8]], [row["completion_ids"]], pad_id=0, chunk_size=4
        )
        gaps += [abs(a - b) for a, b in zip(row["logps"], rescored[0][0])]
    assert 1e-4 < max(gaps) < 0.1  # fp32 decoding would agree to ~1e-6
