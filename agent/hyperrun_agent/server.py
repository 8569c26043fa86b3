"""ttRPC server over a byte stream, with threads.

One thread reads frames; each request is handled on a thread of its own so
that slow calls (WaitProcess, ReadStdout) never hold up fast ones: calls
multiplex on the one connection as in containerd/ttrpc. Responses are
written whole under a lock.
"""
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


class Server:
    def __init__(self, service: str, methods: dict) -> None:
        """methods: name -> (request message class, handler(request) -> response)."""
        self.service = service
        self.methods = methods

    def serve(self, conn: Connection) -> None:
        """Serve requests until the host goes away (end of stream)."""
        write_lock = threading.Lock()
        session = {"open": True}
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
                    threading.Thread(target=self._handle,
                                     args=(conn, write_lock, session, stream_id, payload),
                                     daemon=True).start()
        finally:
            session["open"] = False

    def _handle(self, conn: Connection, write_lock: threading.Lock, session: dict,
                stream_id: int, payload: bytes) -> None:
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
        with write_lock:
            if not session["open"]:
                return  # the host that asked is gone; a new one must not get this
            try:
                conn.write(data)
            except OSError as exc:
                log("cannot reply:", exc)
