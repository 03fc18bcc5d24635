"""`connect_staggered`: a connection attempt whose SYN was lost (as when a HALB VIP moves) gets
a fresh attempt alongside it, and the losers are closed.

In a lab host every other SYN to the server is dropped by iptables, as a dead master drops the
SYNs sent to it before the gratuitous ARP; a refused port fails without a hang.
"""

from __future__ import annotations

import pytest
import trio
from labkit import accepted_from, start_echo_server

from ras.errors import TransportError
from ras.net.tls import connect_staggered

PORT = 7100


@pytest.mark.lab
def test_lost_syns_get_fresh_attempts_and_the_losers_are_closed(make_lab):
    lab = make_lab("client", "server")
    client, server = lab.hosts["client"], lab.hosts["server"]
    echo = start_echo_server(server, PORT)
    server.iptables(
        "-A", "INPUT", "-p", "tcp", "--syn", "--dport", str(PORT),
        "-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0", "-j", "DROP",
    )  # fmt: skip
    address = str(server.address)

    async def main() -> list[bytes]:
        got = []
        for i in range(10):
            with trio.fail_after(30):  # a hang guard only
                stream = await connect_staggered(address, PORT, attempts=3)
            async with stream:
                await stream.send_all(b"ping %d" % i)
                got.append(await stream.receive_some(100))
        return got

    # the sockets must be made inside the client host: run the trio loop there
    got = client.call(trio.run, main)
    assert got == [b"ping %d" % i for i in range(10)]
    dropped = server.iptables("-L", "INPUT", "-v", "-x", "-n").stdout
    assert " DROP " in dropped
    packets = int(dropped.split("DROP")[0].split()[-2])
    assert packets >= 5, dropped  # half the first SYNs were lost...
    assert len(accepted_from(server, echo)) == 10  # ...and no loser was left connected


async def test_a_refused_port_fails_at_once_with_the_reason():
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with trio.fail_after(10), pytest.raises(TransportError, match="refused"):
        await connect_staggered("127.0.0.1", port)
