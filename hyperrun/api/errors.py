"""The CRI's status codes for the project's kinds of failure
(hyperrun/errdefs.py), in one place."""
from __future__ import annotations

import functools

import grpc

from hyperrun import errdefs
from hyperrun.channel.ttrpc import TtrpcError

# Most specific first: an image not found is an image error too.
_CODES = [
    (errdefs.NotFound, grpc.StatusCode.NOT_FOUND),
    (errdefs.Invalid, grpc.StatusCode.INVALID_ARGUMENT),
    (errdefs.Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (errdefs.Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errdefs.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errdefs.Unknown, grpc.StatusCode.UNKNOWN),
]


def describe(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """A known failure's status code and message (what a CRI client sees
    as the error's details); None for anything else (a bug)."""
    if isinstance(exc, TtrpcError):
        return grpc.StatusCode.UNKNOWN, f"guest agent: {exc.remote_message}"
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    return None


def rpc(method):
    """Run an RPC handler; turn known failures into their status codes."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (TtrpcError, *(e for e, _ in _CODES)) as exc:
            await context.abort(*describe(exc))
    return wrapper
