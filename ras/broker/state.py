"""Opening the broker's state: SQLite for one broker, etcd when ``broker.toml`` has ``[etcd]``."""

from __future__ import annotations

from ras.broker.config import BrokerConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.store import SQLiteStore, Store

__all__ = ["open_store"]


def open_store(config: BrokerConfig) -> Store:
    """The store ``config`` names: its ``[etcd]`` cluster, else the SQLite ``database``."""
    if config.etcd is not None:
        return EtcdStore(config.etcd)
    return SQLiteStore(config.database)
