"""The pods' name server (network/dns.py) on loopback: pods' names answer
with their IP as it is now; other names go to the host's servers."""
import asyncio

import dns.asyncquery
import dns.message
import dns.rcode

from hyperrun.network.dns import NameServer


def test_pod_names_and_forwarding():
    pods = {"db": ["10.89.0.7"]}
    askers = set()

    async def main():
        upstream = NameServer(lambda name, client: ["192.0.2.1"] if name == "example.test" else [],
                              upstream=lambda: [])
        assert await upstream.serve_on("127.0.0.1", 15354)
        server = NameServer(lambda name, client: askers.add(client) or pods.get(name, []))
        assert await server.serve_on("127.0.0.1", 15353)
        assert await server.serve_on("127.0.0.1", 15353)  # once per address

        async def ask(name, rdtype="A"):
            return await dns.asyncquery.udp(dns.message.make_query(name, rdtype), "127.0.0.1",
                                            port=15353, timeout=5)
        try:
            r = await ask("db")
            assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["10.89.0.7"]
            assert r.answer[0].ttl == 0  # follows a re-created pod
            assert askers == {"127.0.0.1"}  # told who asks (a compose project's names)
            pods["db"] = ["10.89.0.9"]
            assert (await ask("DB.")).answer[0][0].to_text() == "10.89.0.9"
            r = await ask("db", "AAAA")  # the name is ours: no address of that kind
            assert r.rcode() == dns.rcode.NOERROR and not r.answer
            # Not a pod's: to the host's servers; with none that answers, SERVFAIL.
            server.upstream = lambda: [("127.0.0.1", 15354)]
            assert (await ask("example.test")).answer[0][0].to_text() == "192.0.2.1"
            server.upstream = lambda: []
            assert (await ask("example.test")).rcode() == dns.rcode.SERVFAIL
            # Garbage is dropped, and the server goes on.
            loop = asyncio.get_running_loop()
            t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                       remote_addr=("127.0.0.1", 15353))
            t.sendto(b"\x00garbage")
            t.close()
            assert (await ask("db")).answer
        finally:
            server.close()
            upstream.close()
    asyncio.run(main())


def test_stop_lets_go_of_an_address_from_any_thread():
    async def main():
        server = NameServer(lambda name, client: [])
        assert await server.serve_on("127.0.0.1", 15355)
        await asyncio.to_thread(server.stop, "127.0.0.1")  # a network removed in a thread
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(done.set_result, None)
        await done  # after the close the thread handed the loop (callbacks run in order)
        assert "127.0.0.1" not in server._transports
        assert await server.serve_on("127.0.0.1", 15355)  # the port is free again
        server.stop("127.0.0.1")
        server.stop("127.0.0.2")  # never served: nothing to do
        server.close()
    asyncio.run(main())
