"""Multi-host labs in Linux network namespaces, for tests and for ``ras lab``.

A :class:`Lab` is one private Ethernet segment (a bridge in a namespace of its own) with hosts
on it, each host a network namespace with its own ``eth0``, address and firewall. See
:mod:`ras.lab.netns` for how it is built and torn down.
"""

from ras.lab.netns import (
    CommandError,
    Host,
    Lab,
    LabError,
    LabUnavailableError,
    lab_namespaces,
    lab_unavailable,
)

__all__ = [
    "CommandError",
    "Host",
    "Lab",
    "LabError",
    "LabUnavailableError",
    "lab_namespaces",
    "lab_unavailable",
]
