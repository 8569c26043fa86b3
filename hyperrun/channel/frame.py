"""The ttRPC wire format, shared by the host client and the guest agent.

A frame is a 10-byte big-endian header (u32 payload length, u32 stream id,
u8 type, u8 flags) followed by the payload: a protobuf ``ttrpc.Request``
(type 1) or ``ttrpc.Response`` (type 2). Clients number their streams with
odd ids. This module only frames bytes; it imports nothing heavy because
the guest imports it at boot.
"""
from __future__ import annotations

import struct

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10

TYPE_REQUEST = 0x1
TYPE_RESPONSE = 0x2
TYPE_DATA = 0x3

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4

# As containerd/ttrpc: larger frames are refused, never buffered.
MAX_MESSAGE = 4 << 20

# gRPC status codes used on the channel.
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
FAILED_PRECONDITION = 9
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame."""


def encode(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise FrameError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    return HEADER.pack(len(payload), stream_id, mtype, flags) + payload


def decode_header(header: bytes) -> tuple[int, int, int, int]:
    """Returns (length, stream_id, type, flags); refuses oversized frames."""
    length, stream_id, mtype, flags = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise FrameError(f"frame of {length} bytes exceeds {MAX_MESSAGE}")
    if mtype not in (TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA):
        raise FrameError(f"unknown frame type {mtype:#x}")
    return length, stream_id, mtype, flags


class Decoder:
    """Incremental decoder: feed bytes, take whole frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        """Returns the complete frames as (stream_id, type, flags, payload)."""
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER_SIZE:
            length, stream_id, mtype, flags = decode_header(bytes(self._buf[:HEADER_SIZE]))
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            frames.append((stream_id, mtype, flags, bytes(self._buf[HEADER_SIZE:end])))
            del self._buf[:end]
        return frames

    def reset(self) -> None:
        self._buf.clear()

    @property
    def pending(self) -> int:
        return len(self._buf)
