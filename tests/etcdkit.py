"""A real etcd cluster for tests (``ras.lab.etcdcluster``), skipped where etcd-server is not
installed (``scripts/install-peers`` installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ras.lab.etcdcluster import ETCD, Cluster, etcd_cluster, free_ports

__all__ = ["Cluster", "etcd_cluster", "free_ports", "needs_etcd"]

needs_etcd = pytest.mark.skipif(
    not Path(ETCD).exists(), reason="etcd-server is not installed (scripts/install-peers)"
)
