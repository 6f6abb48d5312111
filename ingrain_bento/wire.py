"""What crosses between the front and the runner, in the cheapest form BentoML's serde offers.

BentoML sends a dependency call's arguments with pickle protocol 5, which passes a numpy
array's buffer out of band, without copying it. So a call carries few large arrays, never a
list of small ones: ``pack`` joins the prepared items of all the requests in one runner call
into one array (stacked when they share a shape, as pixels and CLIP tokens do; joined along
their last axis with a length each when they do not, as unpadded token rows do), and the
runner answers with the rows of all of them in one array (``RowsReply``). Texts that a model
takes raw (no tokenizer split) cross as a list of strings.

Pickle is only ever read from the front, over the runner's private socket: BentoML refuses
pickle bodies on the public (entry) service.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, cast

from ingrain_bento.errors import IngrainError, from_reply
from ingrain_bento.refs import ModelRef

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ModelHandle", "RowsReply", "answer", "fix_media_types", "pack", "split_reply", "unpack"]

T = TypeVar("T")


def fix_media_types(service: Any) -> None:
    """Compute each API's response media type once. BentoML 1.4.40 derives it on every response
    (``IOMixin.mime_type`` builds the output's whole JSON schema with a new pydantic
    ``TypeAdapter``): 62% of the runner's CPU and ~3.5 ms of every runner call, measured with
    py-spy. A preset ``media_type`` is what ``mime_type`` returns first."""
    for method in service.apis.values():
        method.output_spec.media_type = method.output_spec.mime_type()


async def answer(call: Awaitable[T]) -> T:
    """A runner API's result, or its ``IngrainError`` as a JSON reply with that status (BentoML
    would otherwise hide a 5xx message and wrap a 4xx in a list); the front raises it again.

    BentoML sends a returned ``Response`` as it is, whatever the API's annotation, and derives
    the API's output schema from that annotation: so the error reply is cast to ``T`` rather
    than widening every runner API's return type to a union BentoML cannot describe."""
    from starlette.responses import JSONResponse

    try:
        return await call
    except IngrainError as exc:
        return cast(T, JSONResponse(exc.as_reply(), status_code=exc.status_code))


class Packed(TypedDict, total=False):
    counts: list[int]  # items per request, in order
    texts: list[str]
    stacked: np.ndarray  # (items, *shape)
    joined: np.ndarray  # (*leading, total) with ``lengths`` per item along the last axis
    lengths: np.ndarray


class RowsReply(TypedDict):
    rows: np.ndarray | None  # the rows of every request that succeeded, in order
    failed: dict[int, dict[str, Any]]  # request index -> IngrainError.as_reply()
    version: int  # the runner's model-state version (a front clears its caches when it moves)


def pack(requests: Sequence[Sequence[Any]]) -> Packed:
    """The items of several requests as one payload (see the module docstring)."""
    import numpy as np

    items = [item for request in requests for item in request]
    counts = [len(request) for request in requests]
    if all(isinstance(item, str) for item in items):
        return {"counts": counts, "texts": items}
    if len({item.shape for item in items}) == 1:
        return {"counts": counts, "stacked": np.stack(items)}
    return {"counts": counts, "joined": np.concatenate(items, axis=-1),
            "lengths": np.asarray([item.shape[-1] for item in items], dtype=np.int64)}


def unpack(payload: Packed) -> list[list[Any]]:
    """``pack`` undone: each request's items (views into the one array)."""
    import numpy as np

    if "texts" in payload:
        items: Sequence[Any] = payload["texts"]
    elif "stacked" in payload:
        items = list(payload["stacked"])
    else:
        joined, ends = payload["joined"], np.cumsum(payload["lengths"]).tolist()
        items = [joined[..., start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    requests, offset = [], 0
    for count in payload["counts"]:
        requests.append(list(items[offset:offset + count]))
        offset += count
    if offset != len(items):
        raise ValueError(f"the payload holds {len(items)} items, its counts say {offset}")
    return requests


def split_reply(reply: RowsReply, counts: Sequence[int]) -> list[np.ndarray | IngrainError]:
    """Each request's rows, or the error its part of the call ended with."""
    rows = reply["rows"]
    if rows is not None and not rows.flags.writeable:  # unpickled straight from the read-only body
        rows = rows.copy()
    results: list[np.ndarray | IngrainError] = []
    offset = 0
    for index, count in enumerate(counts):
        failure = reply["failed"].get(index)
        if failure is not None:
            results.append(from_reply(failure))
            continue
        assert rows is not None
        results.append(rows[offset:offset + count])
        offset += count
    return results


@dataclass(frozen=True)
class ModelHandle:
    """What the runner tells a front about a model it serves: who it is, which store entry
    (tag with version) its tokenizer and transforms come from, and what it can do."""

    ref: ModelRef
    tag: str
    capabilities: tuple[str, ...]
    embedding_size: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"ref": asdict(self.ref), "tag": self.tag, "capabilities": list(self.capabilities),
                "embedding_size": self.embedding_size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelHandle:
        return cls(ModelRef(**data["ref"]), data["tag"], tuple(data["capabilities"]), data["embedding_size"])
