"""ras: an open implementation of the services of a Remote Application Server farm.

Daemons: the Connection Broker (:mod:`ras.broker`), the Secure Gateway (:mod:`ras.gateway`),
host agents (:mod:`ras.agents`), the HALB (:mod:`ras.halb`) and the client (:mod:`ras.client`),
all on trio, speaking the control protocol of :mod:`ras.protocol` (``docs/protocol.md``).
"""

__version__ = "0.1.0"
