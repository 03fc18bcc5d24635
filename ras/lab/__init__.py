"""Multi-host labs in Linux network namespaces, for tests and for ``ras lab``.

A :class:`Lab` is private Ethernet segments (bridges in a namespace of their own) with hosts
on them, each host a network namespace with its own ``eth0`` (and more interfaces where it
joins several segments), addresses and firewall. See :mod:`ras.lab.netns` for how it is built
and torn down, and :mod:`ras.lab.manifest` for the topology manifest that ``ras lab up``
builds.
"""

from ras.lab.netns import (
    CommandError,
    Host,
    Interface,
    Lab,
    LabError,
    LabUnavailableError,
    Segment,
    lab_namespaces,
    lab_unavailable,
)

__all__ = [
    "CommandError",
    "Host",
    "Interface",
    "Lab",
    "LabError",
    "LabUnavailableError",
    "Segment",
    "lab_namespaces",
    "lab_unavailable",
]
