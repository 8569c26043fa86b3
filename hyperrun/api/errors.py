"""Mapping hyperrun's exceptions to gRPC status codes, in one place."""
from __future__ import annotations

import functools

import grpc

from hyperrun.channel.ttrpc import ConnectionLost, TtrpcError
from hyperrun.image.distribution import PullError
from hyperrun.image.imageconfig import ImageConfigError
from hyperrun.image.reference import InvalidReference
from hyperrun.image.service import ImageError, ImageNotFound
from hyperrun.pods.service import Conflict, Invalid, NotFound
from hyperrun.network import CNIError
from hyperrun.sandbox.podnet import NetworkUnavailable
from hyperrun.sandbox.volumes import VolumeError
from hyperrun.vm import VMError

from .streaming import InvalidRequest, TooManyRequests

_CODES = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ImageNotFound, grpc.StatusCode.NOT_FOUND),
    (Invalid, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidReference, grpc.StatusCode.INVALID_ARGUMENT),
    (ImageConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (TooManyRequests, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (PullError, grpc.StatusCode.UNKNOWN),
    (ImageError, grpc.StatusCode.UNKNOWN),
    (VMError, grpc.StatusCode.UNAVAILABLE),
    (NetworkUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (CNIError, grpc.StatusCode.UNAVAILABLE),
    (VolumeError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConnectionLost, grpc.StatusCode.UNAVAILABLE),
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
