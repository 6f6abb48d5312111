"""One model state past one process (API.md "One model state across runners and replicas"),
with real parts only:

- **Two runners** (``INGRAIN_RUNNERS=2``) under one ``bentoml serve``: a load, unload or delete
  reaches both and the listings show both; each embeds alike (each is killed in turn while the
  other serves); one is SIGKILLed while 64 clients send requests, and none fails.
- **Three replicas**: three ``bentoml serve`` processes, each with its own ``BENTOML_HOME`` and
  port, behind haproxy (Debian's package) health-checking ``/readyz``, sharing
  ``INGRAIN_SHARED_STORE`` in an S3-compatible bucket (moto's server mode on loopback, the
  stand-in for AWS S3, MinIO or GCS). Through the balancer, a load, unload, delete or custom
  download is seen alike on every replica's own port within ``INGRAIN_SYNC_S`` + 1 s plus the load
  time; every replica answers the same embeddings, from the same store entry (one download);
  conflicting calls on two replicas end in one agreed state; a fourth, empty replica converges
  before it says it is ready; a rolling restart under steady load fails no request; with the
  bucket stopped, inference answers and management is a 503 that names the store, and the
  replicas catch up once it is back.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import httpx
import numpy as np
import pytest

from fixtures.compare import MAX_ABS_DIFF, max_abs_diff
from fixtures.replicas import Balancer, SteadyLoad

SYNC_S = 1.0
TEXTS = ["a shared model state", "three replicas, one answer", "x"]
pytestmark = pytest.mark.timeout(900)


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """``check()``'s first truthy value within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, AssertionError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"{what} not within {timeout:.1f} s (last: {last!r})")


def listing(url: str, route: str = "/loaded_models") -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{url}{route}", timeout=30)
    assert response.status_code == 200, response.text
    return {model["id"]: model for model in response.json()["models"]}


def embed(url: str, name: str, texts: list[str] = TEXTS, timeout: float = 60) -> np.ndarray:
    response = httpx.post(f"{url}/embed_text", json={"name": name, "text": texts}, timeout=timeout)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"], dtype=np.float32)


def library_embeddings(name: str) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return np.asarray(SentenceTransformer(name, device="cpu").encode(TEXTS, normalize_embeddings=True))


def ready_everywhere(url: str, model_id: str, runners: int) -> bool:
    model = listing(url).get(model_id)
    return bool(model and model["state"] == "READY" and len(model["runners"]) == runners
                and all(r["state"] == "READY" for r in model["runners"]))


def _restarted(server: Any, before: set[int]) -> bool:
    """One runner worker is new (BentoML restarted the killed one)."""
    return len(set(server.service_pids("ingrain-runner")) - before) == 1


# ---- two runners under one bentoml serve ----------------------------------------------------

@pytest.fixture(scope="module")
def two_runners(real_server_factory, session_dir, hub_models):
    env = {"INGRAIN_RUNNERS": "2", "INGRAIN_HTTP_WORKERS": "1", "INGRAIN_SYNC_S": str(SYNC_S),
           "INGRAIN_REPLICA_ID": "solo"}
    return real_server_factory(session_dir / "bentoml-two-runners", env=env).start(timeout=240)


def test_two_runners_both_follow_load_unload_and_delete_and_both_are_listed(two_runners, hub_models):
    url, st = two_runners.url, hub_models["st"]
    response = httpx.post(f"{url}/load_model", json={"name": st, "library": "sentence_transformers"}, timeout=120)
    assert response.status_code == 200, response.text
    wait_for(lambda: ready_everywhere(url, st, 2), 60, "both runners holding it")
    assert sorted(r["id"] for r in listing(url)[st]["runners"]) == ["solo/0", "solo/1"]

    timm = hub_models["timm"]
    assert httpx.post(f"{url}/load_timm_model", json={"name": timm, "pretrained": True}, timeout=120).status_code == 200
    timm_id = next(i for i in wait_for(lambda: listing(url), 10, "a listing") if i.startswith(timm))
    wait_for(lambda: ready_everywhere(url, timm_id, 2), 60, "both runners holding the timm model")
    assert httpx.post(f"{url}/unload_model", json={"name": timm_id}, timeout=60).status_code == 200
    wait_for(lambda: timm_id not in listing(url), SYNC_S + 1, "the unload on both runners")
    assert httpx.request("DELETE", f"{url}/delete_model", json={"name": timm_id}, timeout=60).status_code == 200
    assert timm_id not in listing(url, "/repository_models")
    gone = httpx.post(f"{url}/classify_image", json={"name": timm_id, "image": []}, timeout=30)
    assert gone.status_code in (400, 404)


def test_two_runners_embed_alike_and_a_killed_runner_loses_no_request(two_runners, hub_models):
    url, st = two_runners.url, hub_models["st"]
    wait_for(lambda: ready_everywhere(url, st, 2), 60, "both runners holding it")
    expected = library_embeddings(st)
    for victim in range(2):  # each runner killed in turn: the other answers alone meanwhile
        pids = two_runners.service_pids("ingrain-runner")
        assert len(pids) == 2
        with SteadyLoad(url, st, clients=64) as load:
            time.sleep(2)
            os.kill(pids[victim], signal.SIGKILL)
            for _ in range(5):
                assert max_abs_diff(embed(url, st), expected, "sentence_transformers text, two runners") < MAX_ABS_DIFF
            wait_for(partial(_restarted, two_runners, set(pids)), 60, "BentoML restarting the runner")
            wait_for(lambda: ready_everywhere(url, st, 2), 90, "the restarted runner holding the model again")
            time.sleep(1)
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100


# ---- three replicas, a balancer, a bucket ----------------------------------------------------

class Replicas:
    def __init__(self, servers: list[Any], balancer_url: str, bucket: str) -> None:
        self.servers, self.url, self.bucket = servers, balancer_url, bucket

    @property
    def live(self) -> list[Any]:
        return [s for s in self.servers if s.process is not None]


@pytest.fixture(scope="module")
def replicas(real_server_factory, session_dir, hub_models, s3_endpoint, file_server) -> Iterator[Replicas]:
    from ingrain_bento.model_state.s3 import s3_client

    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_endpoint}
    os.environ.update(aws)
    bucket = "ingrain-replicas"
    s3_client().create_bucket(Bucket=bucket)
    env = {**aws, "INGRAIN_SHARED_STORE": f"s3://{bucket}/prod", "INGRAIN_SYNC_S": str(SYNC_S),
           "INGRAIN_HTTP_WORKERS": "1", "MAX_LOADED_MODELS": "3"}
    servers = [real_server_factory(session_dir / f"bentoml-replica-{i}", env={**env, "INGRAIN_REPLICA_ID": f"r{i}"})
               for i in range(4)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda s: s.start(timeout=300), servers[:3]))  # the fourth joins later
    balancer = Balancer(session_dir, [s.port for s in servers])
    yield Replicas(servers, balancer.url, bucket)
    balancer.stop()


def _timed_convergence(replicas: Replicas, check: Callable[[str], bool], timeout: float) -> list[float]:
    """Seconds until ``check(url)`` holds on each live replica's own port."""
    started = time.monotonic()
    seconds = []
    for server in replicas.live:
        wait_for(lambda server=server: check(server.url), timeout - (time.monotonic() - started), server.url, 0.05)
        seconds.append(time.monotonic() - started)
    return seconds


def test_a_load_through_the_balancer_reaches_every_replica_from_one_download(replicas, hub_models):
    st = hub_models["st"]
    started = time.monotonic()
    response = httpx.post(f"{replicas.url}/load_model", json={"name": st, "library": "sentence_transformers"},
                          timeout=120)
    assert response.status_code == 200, response.text
    load_s = time.monotonic() - started
    seconds = _timed_convergence(replicas, lambda url: ready_everywhere(url, st, 3), SYNC_S + 1 + 2 * load_s + 5)
    assert max(seconds) <= SYNC_S + 1 + 2 * load_s + 5, (seconds, load_s)
    tags = {listing(s.url)[st]["storeTag"] for s in replicas.live}
    assert len(tags) == 1, f"one store entry, fetched from the bucket, not downloaded again: {tags}"
    expected = library_embeddings(st)
    for server in replicas.live:
        assert max_abs_diff(embed(server.url, st), expected, "sentence_transformers text, replicas") < MAX_ABS_DIFF


def test_unload_delete_and_a_custom_download_are_seen_alike_everywhere(replicas, hub_models, file_server):
    timm = hub_models["timm"]
    assert httpx.post(f"{replicas.url}/load_timm_model", json={"name": timm, "pretrained": True},
                      timeout=120).status_code == 200
    timm_id = next(i for i in listing(replicas.url) if i.startswith(timm))
    _timed_convergence(replicas, lambda url: ready_everywhere(url, timm_id, 3), 60)
    assert httpx.post(f"{replicas.url}/unload_model", json={"name": timm_id}, timeout=60).status_code == 200
    _timed_convergence(replicas, lambda url: timm_id not in listing(url), SYNC_S + 1 + 2)
    response = httpx.request("DELETE", f"{replicas.url}/delete_model", json={"name": timm_id}, timeout=60)
    assert response.status_code == 200, response.text
    _timed_convergence(replicas, lambda url: timm_id not in listing(url, "/repository_models"), SYNC_S + 1 + 2)
    for server in replicas.live:
        gone = httpx.post(f"{server.url}/load_timm_model", json={"name": "no/such-model"}, timeout=30)
        assert gone.status_code in (404, 502)

    body = {"library": "timm", "pretrained_name": "shared-ckpt", "num_classes": 7,
            "safetensors_url": f"{file_server.url}/timm.safetensors"}
    response = httpx.post(f"{replicas.url}/download_custom_model", json=body, timeout=120)
    assert response.status_code == 200, response.text
    _timed_convergence(replicas, lambda url: "shared-ckpt" in listing(url, "/repository_models"), SYNC_S + 1 + 10)


def test_conflicting_calls_on_two_replicas_end_in_one_agreed_state(replicas, hub_models):
    st = hub_models["st"]
    first, second = replicas.live[0].url, replicas.live[1].url
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            unload = pool.submit(httpx.post, f"{first}/unload_model", json={"name": st}, timeout=120)
            load = pool.submit(httpx.post, f"{second}/load_model",
                               json={"name": st, "library": "sentence_transformers"}, timeout=120)
            assert unload.result().status_code in (200, 404) and load.result().status_code == 200

        def agreed() -> bool:
            views = [set(listing(s.url)) for s in replicas.live]
            states = [listing(s.url).get(st, {}).get("state") for s in replicas.live]
            return all(v == views[0] for v in views) and len(set(states)) == 1 and states[0] in (None, "READY")

        wait_for(agreed, 60, "every replica agreeing")
    httpx.post(f"{replicas.url}/load_model", json={"name": st, "library": "sentence_transformers"},
               timeout=120).raise_for_status()
    _timed_convergence(replicas, lambda url: ready_everywhere(url, st, 3), 60)


def test_a_new_empty_replica_converges_before_it_says_it_is_ready(replicas, hub_models):
    st = hub_models["st"]
    newcomer = replicas.servers[3]
    newcomer.start(timeout=300)  # returns once /readyz is 200
    model = listing(newcomer.url).get(st)
    assert model is not None and any(r["id"] == "r3/0" and r["state"] == "READY" for r in model["runners"]), model
    assert "shared-ckpt" in listing(newcomer.url, "/repository_models")
    assert model["storeTag"] == listing(replicas.servers[0].url)[st]["storeTag"]
    wait_for(lambda: all(ready_everywhere(s.url, st, 4) for s in replicas.live), SYNC_S * 4 + 10, "four runners")


def test_a_rolling_restart_under_steady_load_fails_no_request(replicas, hub_models):
    st = hub_models["st"]
    httpx.post(f"{replicas.url}/load_model", json={"name": st, "library": "sentence_transformers"},
               timeout=120).raise_for_status()
    _timed_convergence(replicas, lambda url: ready_everywhere(url, st, len(replicas.live)), 60)
    with SteadyLoad(replicas.url, st, clients=8) as load:
        for server in replicas.live:
            server.stop()
            server.start(timeout=300)
            wait_for(lambda: httpx.get(f"{replicas.url}/readyz", timeout=2).status_code == 200, 10, "the balancer")
            time.sleep(1)  # the balancer's health check sees it ready again
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50


def test_with_the_bucket_stopped_inference_answers_management_is_503_and_it_recovers(replicas, hub_models,
                                                                                       s3_server):
    st, timm = hub_models["st"], hub_models["timm"]
    s3_server.stop()
    try:
        for server in replicas.live:
            assert embed(server.url, st).shape[0] == len(TEXTS)
        refused = httpx.post(f"{replicas.url}/load_timm_model", json={"name": timm, "pretrained": True}, timeout=120)
        assert refused.status_code == 503, refused.text
        assert f"s3://{replicas.bucket}/prod" in refused.json()["message"]
        assert embed(replicas.url, st).shape[0] == len(TEXTS)
    finally:
        s3_server.start()
    response = httpx.post(f"{replicas.url}/load_timm_model", json={"name": timm, "pretrained": True}, timeout=120)
    assert response.status_code == 200, response.text
    timm_id = next(i for i in listing(replicas.url) if i.startswith(timm))
    _timed_convergence(replicas, lambda url: ready_everywhere(url, timm_id, len(replicas.live)), 90)
