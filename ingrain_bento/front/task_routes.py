"""The HTTP routes of the task modules (``tasks.Route``), added to the app from the task table:
a new task's routes need no line in ``service.py``."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI
from fastapi.openapi.models import Example
from pydantic import BaseModel
from starlette.responses import Response

from ingrain_bento.front.http import json_response
from ingrain_bento.tasks import TASKS, Route

__all__ = ["add_task_routes"]


def add_task_routes(app: FastAPI, gateway: Callable[[], Awaitable[Any]]) -> None:
    """Every task module's routes, each a POST whose body is its ``Route.body``, computed with the
    front worker's gateway (``gateway``: the routes' async dependency)."""
    for task in TASKS.values():
        for route in task.routes:
            returns = typing.get_type_hints(route.answer).get("return")
            response_model = returns if isinstance(returns, type) and issubclass(returns, BaseModel) else None
            app.add_api_route(route.path, _endpoint(route, gateway), methods=["POST"], summary=route.summary,
                              response_model=response_model, name=f"{task.name}:{route.path}")


def _endpoint(route: Route, gateway: Callable[[], Awaitable[Any]]) -> Callable[..., Awaitable[Response]]:
    async def endpoint(gw: Any, body: Any) -> Response:
        return json_response(await route.answer(gw, body))

    # FastAPI reads a route's parameters from its signature: the body's schema is the route's own.
    example = {"example": Example(summary=route.summary, value=route.example)}
    endpoint.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("gw", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[Any, Depends(gateway)]),
        inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[route.body, Body(openapi_examples=example)]),
    ], return_annotation=Response)
    return endpoint
