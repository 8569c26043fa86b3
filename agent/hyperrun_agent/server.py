"""ttRPC server over a byte stream, with threads.

One thread reads frames; each request is handled on a thread of its own so
that slow calls (WaitProcess, ReadStdout) never hold up fast ones: calls
multiplex on the one connection as in containerd/ttrpc. Responses are
written whole under a lock.

Each serve() is one host's session. A handler that waits on the guest
for something it then hands over (a read of a process's output) learns of
its session's end (`Call.ended_fd`) and of its reply's fate
(`Call.after_reply`): output taken for a host that is gone goes back to
its stream for the next host, never into a reply nobody receives.
"""
import os
import threading

from google.protobuf.message import DecodeError

from hyperrun.channel import frame
from hyperrun.proto import ttrpc_pb2

from .errors import AgentError
from .log import log


class Connection:
    """A byte stream to the host: read() returns b"" when the host is gone."""

    def read(self, size: int) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Session:
    """One host's session, from its connection to its end (end of stream,
    a bad frame). `ended_fd` becomes readable at its end, for a handler to
    poll beside what it waits for; the pipe is closed once the session has
    ended and none of its calls is left (no fd is closed under a poller)."""

    def __init__(self) -> None:
        self.open = True
        self.write_lock = threading.Lock()
        self.ended_fd, self._end_w = os.pipe()
        self._lock = threading.Lock()
        self._calls = 0

    def begin_call(self) -> None:
        with self._lock:
            self._calls += 1

    def end_call(self) -> None:
        with self._lock:
            self._calls -= 1
            self._close_if_done()

    def end(self) -> None:
        with self._lock:
            self.open = False
            os.write(self._end_w, b".")
            self._close_if_done()

    def _close_if_done(self) -> None:
        if not self.open and self._calls == 0 and self._end_w >= 0:
            os.close(self.ended_fd)
            os.close(self._end_w)
            self.ended_fd = self._end_w = -1


class Call:
    """The request a handler thread is answering: its session, and what to
    do once its reply was written, or could not be (after_reply)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._after: list = []

    @property
    def ended_fd(self) -> int:
        """Readable once the host that asked is gone."""
        return self.session.ended_fd

    def after_reply(self, fn) -> None:
        """fn(delivered) runs after the reply: delivered is True when a
        successful reply was written to the host of this call's session."""
        self._after.append(fn)

    def settle(self, delivered: bool) -> None:
        for fn in self._after:
            try:
                fn(delivered)
            except Exception as exc:  # one settlement's failure must not skip the next
                log("after reply:", repr(exc))
        self._after = []


_local = threading.local()


def current_call() -> Call | None:
    """The call this thread handles, or None outside a server's handler."""
    return getattr(_local, "call", None)


class Server:
    def __init__(self, service: str, methods: dict) -> None:
        """methods: name -> (request message class, handler(request) -> response)."""
        self.service = service
        self.methods = methods

    def serve(self, conn: Connection) -> None:
        """Serve requests until the host goes away (end of stream)."""
        session = Session()
        decoder = frame.Decoder()
        try:
            while True:
                data = conn.read(1 << 16)
                if not data:
                    return
                try:
                    frames = decoder.feed(data)
                except frame.FrameError as exc:
                    # The stream cannot be resynchronised: end this session.
                    log("bad frame from host:", exc)
                    return
                for stream_id, mtype, _flags, payload in frames:
                    if mtype != frame.TYPE_REQUEST:
                        continue
                    session.begin_call()
                    try:
                        threading.Thread(target=self._handle,
                                         args=(conn, session, stream_id, payload),
                                         daemon=True).start()
                    except BaseException:
                        session.end_call()
                        raise
        finally:
            session.end()

    def _handle(self, conn: Connection, session: Session, stream_id: int,
                payload: bytes) -> None:
        call = _local.call = Call(session)
        delivered = False
        try:
            delivered = self._answer(conn, session, stream_id, payload)
        finally:
            _local.call = None
            call.settle(delivered)
            session.end_call()

    def _answer(self, conn: Connection, session: Session, stream_id: int,
                payload: bytes) -> bool:
        """Handle one request and write its reply; True if a successful
        reply was written to the session's host."""
        response = ttrpc_pb2.Response()
        try:
            if stream_id % 2 != 1:  # as containerd/ttrpc: clients number their streams odd
                raise AgentError(frame.INVALID_ARGUMENT,
                                 "StreamID must be odd for client initiated streams")
            try:
                request = ttrpc_pb2.Request.FromString(payload)
            except DecodeError as exc:  # garbage from the host is its error, not ours
                raise AgentError(frame.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            if request.service != self.service or request.method not in self.methods:
                raise AgentError(frame.UNIMPLEMENTED,
                                 f"{request.service}/{request.method} is not implemented")
            req_type, handler = self.methods[request.method]
            try:
                message = req_type.FromString(request.payload)
            except DecodeError as exc:  # likewise for the method's own message
                raise AgentError(frame.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            result = handler(message)
            response.payload = result.SerializeToString()
        except AgentError as exc:
            response.status.code = exc.code
            response.status.message = str(exc)
        except Exception as exc:  # a bug or an OS error: report it, keep serving
            response.status.code = frame.INTERNAL
            response.status.message = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, OSError):
                import traceback

                log("".join(traceback.format_exception(exc)))
        data = frame.encode(stream_id, frame.TYPE_RESPONSE, response.SerializeToString())
        with session.write_lock:
            if not session.open:
                return False  # the host that asked is gone; a new one must not get this
            try:
                conn.write(data)
            except OSError as exc:
                log("cannot reply:", exc)
                return False
        return response.status.code == frame.OK
