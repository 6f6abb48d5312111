"""The two tiers, on one real ``bentoml serve`` with two front workers and one runner.

Every front worker answers from the runner's one model state, embeds alike, and holds no
weights; requests that race an unload complete; the fronts' calls take the runner's own socket;
the runner answers only its fronts (a pickle body or a call without the token sent straight to
BentoML's socket, or to its own, is refused, and nothing happens);
a killed runner is restarted by BentoML while the fronts answer 503 with ``Retry-After``; the
restarted runner answers management at once and serves each model as soon as it is restored
(``INGRAIN_RESTORE_DELAY_S`` makes the restore slow), never "does not answer"; a killed front
worker loses only its own requests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pickle
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from ingrain_bento import schemas as s
from ingrain_bento.frame_socket import socket_path
from ingrain_bento.wire import CALLS, FRAME_MEDIA_TYPE, PICKLE_MEDIA_TYPE

from fixtures.compare import MAX_ABS_DIFF, max_abs_diff
from fixtures.transport import raw_calls

WORKERS = 2
RESTORE_DELAY_S = 1.5


@pytest.fixture(scope="module")
def server(real_server_factory, session_dir, hub_models):
    env = {"INGRAIN_HTTP_WORKERS": str(WORKERS), "INGRAIN_RESTORE_DELAY_S": str(RESTORE_DELAY_S)}
    started = real_server_factory(session_dir / "bentoml-tier", env=env).start()
    for name in (hub_models["st"], hub_models["timm"]):
        library = "timm" if name == hub_models["timm"] else "sentence_transformers"
        response = httpx.post(f"{started.url}/load_model", json={"name": name, "library": library}, timeout=120)
        assert response.status_code == 200, response.text
    return started


def _fresh(method: str, url: str, **kwargs) -> httpx.Response:
    """One request on a new connection (the kernel hands each new connection to either worker)."""
    return httpx.request(method, url, timeout=60, **kwargs)


def _through_every_worker(method: str, url: str, tries: int = 300, **kwargs) -> dict[str, list[httpx.Response]]:
    """Fresh-connection requests until every front worker has answered at least three."""
    seen: dict[str, list[httpx.Response]] = {}
    for _ in range(tries):
        response = _fresh(method, url, **kwargs)
        seen.setdefault(response.headers["x-ingrain-worker"], []).append(response)
        if len(seen) == WORKERS and all(len(answers) >= 3 for answers in seen.values()):
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered in {tries} requests")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _metric(server, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers={"Accept": "text/plain"}).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


def _runner_address(server) -> tuple[str, str]:
    """The runner's address BentoML gives a front worker (its environment), and the token the
    fronts send: what anyone on this machine who finds the socket can reach."""
    front = server.service_pids("ingrain-bento")[0]
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{front}/environ").read_bytes().decode().split("\0")
                   if "=" in item)
    address = json.loads(environ["BENTOML_RUNNER_MAP"])["ingrain-runner"]
    assert address.startswith("file://"), address
    return address, environ["INGRAIN_RUNNER_TOKEN"]


def _runner(server) -> tuple[httpx.Client, str]:
    """A client of the runner's HTTP socket (BentoML's), and the token the fronts send."""
    address, token = _runner_address(server)
    transport = httpx.HTTPTransport(uds=address.removeprefix("file://"))
    return httpx.Client(transport=transport, base_url="http://runner", timeout=30), token


class _CreatesAFile:
    """Unpickling this creates ``path``: the proof that a body was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_the_service_runs_two_front_workers_and_one_runner(server):
    assert len(server.service_pids("ingrain-bento")) == WORKERS
    assert len(server.service_pids("ingrain-runner")) == 1


def test_every_front_worker_answers_from_the_one_model_state(server, hub_models):
    httpx.post(f"{server.url}/unload_model", json={"name": hub_models["timm"]}, timeout=60).raise_for_status()
    for path in ("/loaded_models", "/repository_models", "/v1/models", "/metrics"):
        answers = _through_every_worker("GET", f"{server.url}{path}")
        bodies = {response.text for responses in answers.values() for response in responses}
        assert len(bodies) == 1, f"{path} differs between front workers: {bodies}"
    loaded = httpx.get(f"{server.url}/loaded_models").json()["models"]
    assert [m["name"] for m in loaded] == [hub_models["st"]]


def test_the_same_text_embeds_identically_through_every_worker(server, hub_models):
    from sentence_transformers import SentenceTransformer

    texts = ["the same text", "through every worker"]
    answers = _through_every_worker("POST", f"{server.url}/embed_text", json={"name": hub_models["st"], "text": texts})
    rows = {str(response.json()["embeddings"]) for responses in answers.values() for response in responses}
    assert len(rows) == 1
    expected = SentenceTransformer(hub_models["st"], device="cpu").encode(texts, convert_to_tensor=True,
                                                                          normalize_embeddings=True)
    got = next(iter(answers.values()))[0].json()["embeddings"]
    assert max_abs_diff(got, expected, "sentence_transformers text (served)") <= MAX_ABS_DIFF


def test_the_weights_live_in_the_runner_process_only(server, hub_models):
    """all-MiniLM-L6-v2 holds ~90 MB of weights: the runner grows by most of that (it may reuse
    heap an earlier unload freed); a front worker opens only its tokenizer (weights on torch's
    meta device), a small part of it."""
    fronts, runner = server.service_pids("ingrain-bento"), server.service_pids("ingrain-runner")[0]
    _through_every_worker("POST", f"{server.url}/embed_text", json={"name": hub_models["st"], "text": "warm"})
    before = {pid: _rss_mb(pid) for pid in (*fronts, runner)}
    name = hub_models["minilm"]
    httpx.post(f"{server.url}/load_model", json={"name": name, "library": "sentence_transformers"},
               timeout=120).raise_for_status()
    _through_every_worker("POST", f"{server.url}/embed_text", json={"name": name, "text": "a query"})
    weights_mb = next(m["memoryBytes"] for m in httpx.get(f"{server.url}/loaded_models").json()["models"]
                      if m["name"] == name) / 2**20
    grown = {pid: _rss_mb(pid) - before[pid] for pid in before}
    assert weights_mb > 80 and grown[runner] > weights_mb / 2, (weights_mb, grown)
    assert all(grown[pid] < weights_mb / 4 for pid in fronts), (weights_mb, grown)


def test_no_runner_call_needs_a_second_connection_attempt(server, hub_models):
    """BentoML's dependency client would close its connection pool every 100 calls, calls in
    flight included (service.py: runner_connection); each failed call would be sent again, and
    counted. Listings are not coalesced, so this burst keeps many calls in flight at once."""
    before = _metric(server, "ingrain_runner_retries_total")

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            embed = {"name": hub_models["st"], "text": "x"}
            requests = [client.post(f"{server.url}/embed_text", json=embed) if i % 2 else
                        client.get(f"{server.url}/repository_models") for i in range(400)]
            return [response.status_code for response in await asyncio.gather(*requests)]

    statuses = asyncio.run(burst())
    assert Counter(statuses) == {200: 400}
    assert _metric(server, "ingrain_runner_retries_total") == before


def test_a_pickle_body_posted_straight_to_the_runner_is_refused_with_or_without_the_token(server, hub_models,
                                                                                          tmp_path):
    runner, token = _runner(server)
    proof = tmp_path / "unpickled"
    body = pickle.dumps(_CreatesAFile(proof))
    with runner:
        for path in ("/ingrain/load", "/ingrain/infer", "/ingrain/describe", "/load", "/infer", "/", "/metrics"):
            for auth in ({}, {"Authorization": f"Bearer {token}"}):
                response = runner.post(path, content=body, headers={"Content-Type": PICKLE_MEDIA_TYPE, **auth})
                assert response.status_code == 415, (path, auth, response.status_code, response.text)
    assert not proof.exists(), "the runner unpickled a body"
    embed = httpx.post(f"{server.url}/embed_text", json={"name": hub_models["st"], "text": "still here"}, timeout=60)
    assert embed.status_code == 200


def test_a_management_call_to_the_runner_without_the_token_is_refused_and_changes_nothing(server, hub_models):
    runner, token = _runner(server)
    before = httpx.get(f"{server.url}/loaded_models").json()
    unload = CALLS["unload"].encode_args({"request": s.ModelRequest(name=hub_models["st"])})
    with runner:
        for auth in ({}, {"Authorization": "Bearer guessed"}, {"Authorization": token}):
            headers = {"Content-Type": FRAME_MEDIA_TYPE, **auth}
            response = runner.post("/ingrain/unload", content=unload, headers=headers)
            assert response.status_code == 401, (auth, response.text)
        assert runner.get("/livez").status_code == 200, "the probes stay open"
    assert httpx.get(f"{server.url}/loaded_models").json() == before


def test_the_fronts_calls_take_the_runners_own_socket_which_answers_only_with_the_token(server, hub_models):
    import stat

    address, token = _runner_address(server)
    own = Path(str(socket_path(address, 0)))
    assert stat.S_ISSOCK(own.stat().st_mode) and stat.S_IMODE(own.stat().st_mode) == 0o600
    httpx.post(f"{server.url}/embed_text", json={"name": hub_models["st"], "text": "on the socket"}, timeout=60)
    # a listening Unix socket's accepted connections carry its path: the fronts are connected to it
    assert Path("/proc/net/unix").read_text().count(str(own)) >= 2
    before = httpx.get(f"{server.url}/loaded_models").json()
    unload = ("unload", CALLS["unload"].encode_args({"request": s.ModelRequest(name=hub_models["st"])}))
    for first in ([], [("token", b"guessed")]):
        replies = raw_calls(str(own), [*first, unload])
        assert [status for status, _ in replies] == [401], replies  # then closed: the unload is never read
    assert httpx.get(f"{server.url}/loaded_models").json() == before
    listing = ("loaded_models", CALLS["loaded_models"].encode_args({}))
    (token_status, _), (status, body) = raw_calls(str(own), [("token", token.encode()), listing])
    assert (token_status, status) == (200, 200)
    assert sorted(m.id for m in CALLS["loaded_models"].decode_result(body)) == sorted(
        m["id"] for m in before["models"])


def test_eight_clients_through_ten_unload_reload_cycles_get_no_server_error(server, hub_models):
    name = hub_models["st"]
    statuses: Counter[int] = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                body = {"name": name, "text": "racing an unload"}
                status = http.post(f"{server.url}/embed_text", json=body).status_code
                with lock:
                    statuses[status] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(10):
            time.sleep(0.3)
            assert _fresh("POST", f"{server.url}/unload_model", json={"name": name}).status_code == 200
            time.sleep(0.3)
            _fresh("POST", f"{server.url}/load_model", json={"name": name, "library": "sentence_transformers"})
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert statuses[200] > 50 and set(statuses) == {200}, statuses


def test_a_killed_front_worker_loses_only_its_own_requests(server, hub_models):
    victim = server.service_pids("ingrain-bento")[0]
    body = {"name": hub_models["st"], "text": "still served"}
    os.kill(victim, signal.SIGKILL)
    answered: Counter[str] = Counter()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and answered["200"] < 20:
        try:
            answered[str(_fresh("POST", f"{server.url}/embed_text", json=body).status_code)] += 1
        except httpx.TransportError:
            answered["connection error"] += 1  # only a connection the dead worker had accepted
    assert answered["200"] >= 20 and set(answered) <= {"200", "connection error"}, answered
    assert answered["connection error"] <= 1, answered
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(server.service_pids("ingrain-bento")) < WORKERS:
        time.sleep(0.5)
    assert victim not in server.service_pids("ingrain-bento") and len(server.service_pids("ingrain-bento")) == WORKERS


def test_a_killed_runner_answers_503_with_retry_after_then_serves_its_models_again(server, hub_models):
    loaded = sorted(m["id"] for m in httpx.get(f"{server.url}/loaded_models").json()["models"])
    assert hub_models["st"] in loaded
    victim = server.service_pids("ingrain-runner")[0]
    answers: list[tuple[float, float, int, str]] = []  # (sent, seconds, status, retry-after)
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=60) as http:  # a connection error would raise here and end the test
            while not stop.is_set():
                sent = time.monotonic()
                response = http.post(f"{server.url}/embed_text", json={"name": hub_models["st"], "text": "a crash"})
                with lock:
                    answers.append((sent, time.monotonic() - sent, response.status_code,
                                    response.headers.get("retry-after", "")))
                if response.status_code == 503:
                    time.sleep(0.2)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with lock:
            back = [a for a in answers if a[0] > killed_at and a[2] == 200]
        if len(back) >= 8:
            break
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(60)
    statuses = Counter(status for _, _, status, _ in answers)
    assert set(statuses) == {200, 503}, statuses
    assert all(int(retry) > 0 for _, _, status, retry in answers if status == 503)
    assert max(seconds for _, seconds, _, _ in answers) < 15, "a request waited on the dead runner"
    assert len([a for a in answers if a[0] > killed_at and a[2] == 200]) >= 8, "serving again after the restart"
    assert server.service_pids("ingrain-runner") != [victim]
    _wait_ready(server)
    restored = sorted(m["id"] for m in httpx.get(f"{server.url}/loaded_models").json()["models"])
    assert restored == loaded
    assert _metric(server, "ingrain_runner_starts_total") >= 2


def _wait_ready(server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "not ready again"
        time.sleep(0.3)


def _png() -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 200, 90)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_restarted_runner_answers_at_once_and_serves_each_model_as_soon_as_it_is_restored(server, hub_models):
    """Three resident models, restored one at a time, each after RESTORE_DELAY_S: listings and
    management answer within a second throughout, the first model restored answers 200 while the
    others are still LOADING, /readyz is 503 until the last is back, and once the new runner
    answers no request is told that it does not."""
    _wait_ready(server)
    order = [(hub_models["st"], "sentence_transformers"), (hub_models["timm"], "timm"),
             (hub_models["clip_hub"], "open_clip")]
    for name, _ in order:  # the restore follows the load order
        httpx.post(f"{server.url}/unload_model", json={"name": name}, timeout=60)
    for name, library in order:
        httpx.post(f"{server.url}/load_model", json={"name": name, "library": library}, timeout=120).raise_for_status()
    image = _png()
    bodies = {hub_models["st"]: ("/embed_text", {"name": hub_models["st"], "text": "first back"}),
              hub_models["clip_hub"]: ("/embed_image", {"name": hub_models["clip_hub"], "image": image})}
    runner, _ = _runner(server)
    victim = server.service_pids("ingrain-runner")[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # until the new runner process answers its own socket
        try:
            if runner.get("/livez", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the runner did not come back"
        time.sleep(0.05)
    answered_at = time.monotonic()
    runner.close()

    answers: list[tuple[float, str, int, str]] = []  # (sent, model, status, body)
    stop = threading.Event()

    def client(model: str) -> None:
        path, body = bodies[model]
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                response = http.post(f"{server.url}{path}", json=body)
                answers.append((sent, model, response.status_code, response.text[:200]))

    threads = [threading.Thread(target=client, args=(model,)) for model in bodies]
    for thread in threads:
        thread.start()
    listings: list[tuple[float, float, dict[str, str], int]] = []  # (sent, seconds, states, readyz)
    try:
        while time.monotonic() < answered_at + 60:
            ready = httpx.get(f"{server.url}/readyz", timeout=10).status_code  # first: ready means all restored
            sent = time.monotonic()
            listing = httpx.get(f"{server.url}/repository_models", timeout=10)
            assert listing.status_code == 200, listing.text
            models = listing.json()["models"]
            seconds = time.monotonic() - sent
            states = {m["name"]: m["state"] for m in models if m["name"] in dict(order)}
            listings.append((sent, seconds, states, ready))
            size = httpx.get(f"{server.url}/model_embedding_size", params={"name": hub_models["st"]}, timeout=10)
            assert size.status_code == 200 and time.monotonic() - sent < 2.0
            if set(states.values()) == {"READY"} and listings[-1][3] == 200:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert max(seconds for _, seconds, _, _ in listings) < 1.0, "a listing waited for the restore"
    assert any("LOADING" in states.values() for _, _, states, _ in listings), "the restore was seen"
    all_back = next(sent for sent, _, states, ready in listings if set(states.values()) == {"READY"})
    first_ok = min(sent for sent, model, status, _ in answers if model == hub_models["st"] and status == 200)
    assert first_ok < all_back, "the first model restored served while the others were LOADING"
    assert all(set(states.values()) == {"READY"} for _, _, states, ready in listings if ready == 200)
    assert any(ready == 503 for _, _, states, ready in listings if "LOADING" in states.values())
    late = [a for a in answers if a[0] > answered_at + 1.0]
    assert late and all(status == 200 for _, _, status, _ in late), Counter((s, b) for _, _, s, b in late)
