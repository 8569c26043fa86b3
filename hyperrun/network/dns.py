"""The name server a daemon gives its pods on CNI networks, as Docker's
embedded DNS: a pod's name (a run's `--name`) answers with its IP as it is
now (TTL 0: the answer follows a re-created pod), and so does a compose
service's name, for the pods of its own project only (the lookup is told
who asks), and every other question
goes to the host's own name servers, loopback ones included (a VM cannot
reach the host's 127.0.0.53; this server, on the host, can).

It listens on UDP port 53 of each network's gateway address (the bridge's,
on the host), made at the first pod of that network; a pod whose DNS
config is its own (the kubelet's) never asks it. dnspython parses and
builds the messages.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

from hyperrun import log

logger = log.get("dns")
PORT = 53
IP_FREEBIND = 15  # linux/in.h; Python's socket module does not name it
UPSTREAM_TIMEOUT_S = 3.0  # a resolver in the guest waits 5 s per try


def upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    servers = []
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                servers.append(parts[1])
    except OSError:
        pass
    return servers


class NameServer:
    def __init__(self, lookup: Callable[[str, str], list[str]],
                 upstream: Callable[[], list[str]] = upstreams) -> None:
        """lookup(name, client): the IPv4 addresses of the pod of that name
        as the pod at the address client sees it, or []."""
        self.lookup = lookup
        self.upstream = upstream
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve_on(self, address: str, port: int = PORT) -> bool:
        """Listen on address:port (once per address); False if it cannot."""
        if address in self._transports:
            return True
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                             socket.SOCK_DGRAM)
        try:
            # The bridge (and so its address) may come with the pod's CNI ADD.
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            logger.warning("no name server for the pods", address=address, error=str(exc))
            return False
        loop = self._loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        self._transports[address] = transport
        return True

    def stop(self, address: str) -> None:
        """Stop listening on address (its network is gone); from any thread."""
        def close() -> None:
            if transport := self._transports.pop(address, None):
                transport.close()
        if self._loop is None or self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            close()
        else:
            self._loop.call_soon_threadsafe(close)

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()

    async def answer(self, data: bytes, client: str = "") -> bytes | None:
        import dns.exception
        import dns.flags
        import dns.message
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None  # not DNS: nothing to say
        if len(query.question) == 1:
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            addresses = self.lookup(name, client) if question.rdclass == dns.rdataclass.IN else []
            if addresses:
                response = dns.message.make_response(query)
                response.flags |= dns.flags.AA
                if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
                    response.answer.append(dns.rrset.from_text_list(
                        question.name, 0, "IN", "A", addresses))
                return response.to_wire()  # AAAA and others: none, but the name is ours
        return await self._forward(query)

    async def _forward(self, query) -> bytes:
        import dns.asyncquery
        import dns.exception
        import dns.message
        import dns.rcode

        for server in self.upstream():  # an address, or (address, port)
            host, port = (server, PORT) if isinstance(server, str) else server
            try:
                response = await dns.asyncquery.udp(query, host, port=port,
                                                    timeout=UPSTREAM_TIMEOUT_S,
                                                    ignore_unexpected=True)
                return response.to_wire()
            except (dns.exception.DNSException, OSError):
                continue
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.SERVFAIL)
        return response.to_wire()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: NameServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        task = asyncio.ensure_future(self._reply(data, addr))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reply(self, data: bytes, addr) -> None:
        try:
            reply = await self.server.answer(data, addr[0])
        except Exception as exc:  # one bad question must not end the server
            logger.warning("DNS question not answered", error=str(exc))
            return
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)
