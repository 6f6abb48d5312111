"""Every knob of the server, read from the environment in one place.

Ingrain server's own names are kept where they exist (``MAX_LOADED_MODELS``,
``MAX_BATCH_SIZE``, ``DYNAMIC_BATCHING``, ``FP16_ENABLED``); everything else is
prefixed ``INGRAIN_``. ``Settings()`` is cheap; ``get_settings()`` caches one per process.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["RUNNER_TOKEN_ENV", "Settings", "ensure_runner_token", "get_settings"]


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    port: int = Field(8687, ge=1, le=65535, validation_alias=_env("INGRAIN_PORT"),
                      description="Default port of `bentoml serve` (`--port` overrides it).")
    http_workers: int | None = Field(None, ge=1, validation_alias=_env("INGRAIN_HTTP_WORKERS"),
                                     description="Front (HTTP) worker processes (default: chosen from the machine, "
                                                 "see README Performance).")
    engine_process: Literal["auto", "front", "runner"] = Field(
        "auto", validation_alias=_env("INGRAIN_ENGINE_PROCESS"),
        description="Where the models live: in the front's own process, or in the runner service (auto: the "
                    "front's when the machine has no GPU and one front worker; README \"Two tiers\").")
    runner_token: str | None = Field(None, validation_alias=_env("INGRAIN_RUNNER_TOKEN"),
                                     description="The secret every call to the runner carries (generated per "
                                                 "`bentoml serve` when unset; the same secret on both services when "
                                                 "they run apart).")
    restore: bool = Field(True, validation_alias=_env("INGRAIN_RESTORE"),
                          description="A (re)started runner loads the models that were resident before.")
    load_wait_s: float = Field(30.0, gt=0, validation_alias=_env("INGRAIN_LOAD_WAIT_S"),
                               description="How long an inference request waits for its model to load (or to be "
                                           "restored after a restart) before a 503 with Retry-After.")
    restore_delay_s: float = Field(0.0, ge=0, validation_alias=_env("INGRAIN_RESTORE_DELAY_S"),
                                   description="A pause before each model a start restores: a slow restore on cue, "
                                               "for testing restarts (0: none).")
    max_loaded_models: int = Field(5, ge=1, validation_alias=_env("MAX_LOADED_MODELS"),
                                   description="Resident models at most (Ingrain's default 5).")
    max_batch_size: int = Field(64, ge=1, validation_alias=_env("MAX_BATCH_SIZE"),
                                description="Items in one forward pass; larger requests are split.")
    dynamic_batching: bool = Field(True, validation_alias=_env("DYNAMIC_BATCHING"),
                                   description="Merge concurrent requests into one forward per model.")
    max_batch_tokens: int | None = Field(None, ge=1, validation_alias=_env("INGRAIN_MAX_BATCH_TOKENS"),
                                         description="Padded tokens (items x longest text) of one forward at most "
                                                     "(default: MAX_BATCH_SIZE x half the model's context; under "
                                                     "ONNX Runtime on a CPU at most MAX_BATCH_SIZE x 32).")
    batch_wait_ms: float = Field(2.0, ge=0, validation_alias=_env("INGRAIN_BATCH_WAIT_MS"),
                                 description="How long a forming batch waits for more requests.")
    torch_threads: int | None = Field(None, ge=1, validation_alias=_env("INGRAIN_TORCH_THREADS"),
                                      description="Intra-op threads of every forward, torch's and ONNX Runtime's "
                                                  "(default: theirs, one per core).")
    backend: str = Field(
        "auto", validation_alias=_env("INGRAIN_BACKEND"),
        description="The backend a load gets when it names none: auto (per model and device, the faster one "
                    "timed on this machine when the model was exported: README \"Backends\"), or a backend of "
                    "backends.BACKENDS that may be the default (torch, onnx; onnx-int8 is per load only).")
    onnx_spinning: bool = Field(False, validation_alias=_env("INGRAIN_ONNX_SPINNING"),
                                description="ONNX Runtime's idle threads spin for work: less latency alone, more CPU "
                                            "(README Performance).")
    export_timeout_s: float = Field(900.0, gt=0, validation_alias=_env("INGRAIN_EXPORT_TIMEOUT_S"),
                                    description="How long a model's ONNX export may take (then it loads with torch).")
    fp16_enabled: bool = Field(True, validation_alias=_env("FP16_ENABLED"),
                               description="Half-precision weights on CUDA (CPU always runs fp32).")
    device: str | None = Field(None, validation_alias=_env("INGRAIN_DEVICE"),
                               description="Force a torch device (`cpu`, `cuda:1`); default CUDA when present.")
    autoload: bool = Field(True, validation_alias=_env("INGRAIN_AUTOLOAD"),
                           description="Inference on a stored but not resident model loads it first.")
    eviction: Literal["evict", "reject"] = Field(
        "evict", validation_alias=_env("INGRAIN_EVICTION"),
        description="At capacity: unload the least recently used idle model, or answer 503.")
    max_model_memory: int | None = Field(None, ge=1, validation_alias=_env("INGRAIN_MAX_MODEL_MEMORY"),
                                         description="Bytes of resident weights at most (unset: no budget).")
    api_key: str | None = Field(None, validation_alias=_env("INGRAIN_API_KEY"),
                                description="When set, required as `Authorization: Bearer <key>`.")
    allow_private_urls: bool = Field(False, validation_alias=_env("INGRAIN_ALLOW_PRIVATE_URLS"),
                                     description="Let URL fetches reach loopback/private/link-local addresses.")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, validation_alias=_env("INGRAIN_MAX_REQUEST_BYTES"),
                                   description="Bytes of one request body at most (413 above).")
    max_items_per_request: int = Field(2048, ge=1, validation_alias=_env("INGRAIN_MAX_ITEMS"),
                                       description="Texts or images in one request at most (413 above).")
    max_text_chars: int = Field(100_000, ge=1, validation_alias=_env("INGRAIN_MAX_TEXT_CHARS"),
                                description="Characters in one text at most (413 above).")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, validation_alias=_env("INGRAIN_MAX_IMAGE_BYTES"),
                                 description="Encoded bytes of one image at most (413 above).")
    max_image_pixels: int = Field(50_000_000, ge=1, validation_alias=_env("INGRAIN_MAX_IMAGE_PIXELS"),
                                  description="Decoded pixels of one image at most (400 above).")
    max_request_pixels: int = Field(400_000_000, ge=1, validation_alias=_env("INGRAIN_MAX_REQUEST_PIXELS"),
                                    description="Decoded pixels of all the images of one request at most (413 "
                                                "above), read from the image headers before any is decoded.")
    image_timeout_s: float = Field(10.0, gt=0, validation_alias=_env("INGRAIN_IMAGE_TIMEOUT_S"),
                                   description="Timeout for fetching one image URL.")
    max_download_bytes: int = Field(8 * 1024**3, ge=1, validation_alias=_env("INGRAIN_MAX_DOWNLOAD_BYTES"),
                                    description="Bytes of one custom-model file at most (413 above).")
    download_timeout_s: float = Field(600.0, gt=0, validation_alias=_env("INGRAIN_DOWNLOAD_TIMEOUT_S"),
                                      description="Timeout for one custom-model file download.")
    download_deadline_s: float = Field(1800.0, gt=0, validation_alias=_env("INGRAIN_DOWNLOAD_DEADLINE_S"),
                                       description="Total time one custom-model file download may take (504 above).")
    access_log: bool = Field(False, validation_alias=_env("INGRAIN_ACCESS_LOG"),
                             description="BentoML's per-request access log (management actions are always logged).")
    tracing: bool = Field(False, validation_alias=_env("INGRAIN_TRACING"),
                          description="BentoML's OpenTelemetry tracing middleware (off: no per-request spans).")
    preload: str | None = Field(None, validation_alias=_env("INGRAIN_PRELOAD"),
                                description="Path of a models/*.yaml list to pull and load at start-up.")
    runners: int | None = Field(None, ge=1, le=64, validation_alias=_env("INGRAIN_RUNNERS"),
                                description="Runner worker processes on this machine, one per device, each with its "
                                            "own copy of the models (default: the number of GPUs, 1 without one).")
    shared_store: str | None = Field(None, pattern=r"^s3://[^/]+(/.*)?$",
                                     validation_alias=_env("INGRAIN_SHARED_STORE"),
                                     description="`s3://bucket/prefix`: the store entries and the desired model state "
                                                 "shared by every replica (the S3 client reads the standard `AWS_*` "
                                                 "variables, `AWS_ENDPOINT_URL` included); unset: this machine alone.")
    replica_id: str | None = Field(None, min_length=1, max_length=120, pattern=r"^[A-Za-z0-9._:-]+$",
                                   validation_alias=_env("INGRAIN_REPLICA_ID"),
                                   description="This replica's name in listings (default: the host name and port).")
    default_model: str | None = Field(None, min_length=1, validation_alias=_env("INGRAIN_DEFAULT_MODEL"),
                                      description="The model the TEI-protocol routes use, which name none (unset: the "
                                                  "only resident model able to do the task).")
    sync_s: float = Field(2.0, gt=0, le=300, validation_alias=_env("INGRAIN_SYNC_S"),
                          description="How often a runner checks the desired model state and reports what it holds.")

    @field_validator("backend")
    @classmethod
    def _server_backend(cls, value: str) -> str:
        from ingrain_bento.backends.base import BACKENDS

        allowed = ["auto", *(name for name, spec in BACKENDS.items() if spec.server_default)]
        if value not in allowed:
            raise ValueError(f"INGRAIN_BACKEND is {value!r}: use one of {', '.join(allowed)}")
        return value


RUNNER_TOKEN_ENV = "INGRAIN_RUNNER_TOKEN"


def ensure_runner_token() -> str:
    """``INGRAIN_RUNNER_TOKEN``, generated (and put in the environment) when unset. Called by the
    service module at import, in the ``bentoml serve`` process, before BentoML starts the workers:
    every worker inherits it (and reads it in its settings)."""
    return os.environ.setdefault(RUNNER_TOKEN_ENV, secrets.token_urlsafe(32))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
