"""Agent entry point: /sbin/init in the guest image runs main()."""
import time as _t

_T_START = _t.monotonic()

import os
import sys
import threading
import time

from . import init
from .containers import Containers
from .log import log
from .reaper import Reaper
from .server import Server
from .service import SERVICE, AgentService
from . import transport


def serve_serial(server: Server, path: str) -> None:
    conn = transport.SerialConnection(path)
    log("serving on", path)
    while True:
        server.serve(conn)
        conn.wait_for_host()


def serve_vsock(server: Server) -> None:
    listener = transport.vsock_listener()
    log("serving on vsock port", transport.VSOCK_PORT)
    while True:
        sock, _ = listener.accept()
        conn = transport.SocketConnection(sock)

        def run(conn=conn) -> None:
            try:
                server.serve(conn)
            finally:
                conn.close()

        threading.Thread(target=run, daemon=True).start()


def main() -> None:
    pid1 = os.getpid() == 1
    try:
        log(f"imported in {time.monotonic() - _T_START:.3f}s")
        if pid1:
            init.setup()
        log("init done")
        service = AgentService(Containers(Reaper()))
        server = Server(SERVICE, service.methods())
        path = transport.find_serial_port()
        if path is not None:
            serve_serial(server, path)
        else:
            serve_vsock(server)
    except BaseException as exc:
        log("fatal:", repr(exc))
        if not pid1:
            raise
        import traceback
        traceback.print_exc()
    # PID 1 must not return (the kernel would panic); end the VM instead.
    from . import syscalls
    time.sleep(0.1)
    syscalls.reboot()
    sys.exit(1)


if __name__ == "__main__":
    main()
