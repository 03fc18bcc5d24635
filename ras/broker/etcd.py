"""A small etcd v3 client for the broker: etcd's JSON gateway over HTTP(S), several members.

Why etcd3gw (OpenStack's client of etcd's ``/v3/`` JSON gateway): it needs only ``requests``,
where the gRPC clients pin grpcio and protobuf versions (``etcd3`` works only with protobuf
3.20), and it takes TLS client certificates. It talks to one member; :class:`Etcd` keeps one
per configured member and moves to the next when a member cannot be reached or does not answer
in time, so a broker keeps working while a majority of the cluster does.

Calls are synchronous and short: the broker runs them in worker threads. Requests that change
something are transactions where it matters (single use: compare ``create_revision`` to 0),
so a request retried on another member after a timeout can only be refused, never applied
twice with two successes. Keys and values travel base64-encoded; fields at their default
value are left out of answers (a failed transaction has no ``succeeded``).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import (
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
    InternalServerError,
)

from ras.config import Invalid, check_host, check_port, check_positive
from ras.errors import RasError
from ras.ops.metrics import ETCD_FAILURES, ETCD_OPERATIONS

__all__ = ["Etcd", "EtcdConfig", "EtcdUnavailable", "KeyValue", "Op", "parse_endpoint"]


class EtcdUnavailable(RasError):
    """No member of the etcd cluster answered (or none had a majority behind it)."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of an etcd member's client URL."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    check_host("host", host)
    check_port("port", int(port), zero_ok=False)
    return host, int(port)


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """The ``[etcd]`` table of ``broker.toml``: the members' client addresses (``host:port``),
    the key prefix of this farm, and TLS (``ca_file``; ``cert_file`` + ``key_file`` for a
    client certificate) if the members serve HTTPS."""

    endpoints: tuple[str, ...]
    prefix: str = "/ras/"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise Invalid("endpoints", "name at least one etcd member (host:port)")
        for i, endpoint in enumerate(self.endpoints):
            try:
                parse_endpoint(endpoint)
            except ValueError as exc:
                raise Invalid(f"endpoints[{i}]", str(exc)) from None
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise Invalid("prefix", "must start and end with '/'")
        if (self.cert_file is None) != (self.key_file is None):
            raise Invalid("cert_file", "cert_file and key_file go together")
        check_positive("timeout_s", self.timeout_s)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


# the gateway's paths -> the operation label of ras_broker_etcd_failures (a fixed set)
_OPERATIONS = {
    "kv/range": "range",
    "kv/put": "put",
    "kv/deleterange": "delete",
    "kv/txn": "txn",
    "lease/grant": "lease_grant",
    "lease/keepalive": "lease_keepalive",
    "kv/lease/revoke": "lease_revoke",
}
_failures = {op: ETCD_FAILURES.labels(op) for op in ETCD_OPERATIONS}  # each at 0 from the start


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        _unb64(raw["key"]),
        _unb64(raw.get("value", "")),
        int(raw.get("create_revision", 0)),
        int(raw.get("mod_revision", 0)),
        int(raw.get("lease", 0)),
    )


class Op:
    """Builders of a transaction's compares and requests (the gateway's JSON)."""

    @staticmethod
    def absent(key: bytes) -> dict[str, Any]:
        return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}

    @staticmethod
    def mod_revision_is(key: bytes, revision: int) -> dict[str, Any]:
        return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}

    @staticmethod
    def unchanged(key: bytes, seen: KeyValue | None) -> dict[str, Any]:
        """``key`` is as it was when read as ``seen`` (None: it did not exist)."""
        return Op.absent(key) if seen is None else Op.mod_revision_is(key, seen.mod_revision)

    @staticmethod
    def value_is(key: bytes, value: bytes) -> dict[str, Any]:
        return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}

    @staticmethod
    def lease_is(key: bytes, lease: int) -> dict[str, Any]:
        return {"key": _b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease)}

    @staticmethod
    def put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return {"request_put": body}

    @staticmethod
    def get(key: bytes) -> dict[str, Any]:
        return {"request_range": {"key": _b64(key)}}

    @staticmethod
    def delete(key: bytes) -> dict[str, Any]:
        return {"request_delete_range": {"key": _b64(key)}}


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]]

    def ranged(self, index: int) -> list[KeyValue]:
        """The key-values read by the ``index``-th request (a ``get``)."""
        got = self.responses[index].get("response_range", {})
        return [_kv(kv) for kv in got.get("kvs", [])]


class Etcd:
    """The cluster, through whichever member answers (thread-safe)."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        cert = (
            (str(config.cert_file), str(config.key_file))
            if config.cert_file is not None and config.key_file is not None
            else (None, None)
        )
        self._members = [
            Etcd3Client(
                host,
                port,
                protocol="https" if config.tls else "http",
                ca_cert=None if config.ca_file is None else str(config.ca_file),
                cert_cert=cert[0],
                cert_key=cert[1],
                timeout=config.timeout_s,
                api_path="/v3/",
            )
            for host, port in map(parse_endpoint, config.endpoints)
        ]
        self._current = 0
        self._lock = threading.Lock()
        # whether the last request was answered by a member (a refusal is an answer): what
        # ras_broker_etcd_up shows, kept by the requests the broker makes anyway (its role's
        # lease refresh every third of primary_lease_s, the poll of changes every poll_s)
        self.reachable = False

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One gateway request, to the member that answered last, else the next ones."""
        with self._lock:
            start = self._current
        failures: list[str] = []
        for i in range(len(self._members)):
            index = (start + i) % len(self._members)
            member = self._members[index]
            try:
                answer: dict[str, Any] = member.post(member.get_url(path), json=payload)
            except (ConnectionFailedError, ConnectionTimeoutError, InternalServerError) as exc:
                failures.append(f"{member.host}:{member.port}: {_why(exc)}")
                continue
            except Etcd3Exception as exc:
                self.reachable = True  # a member answered, with a refusal
                raise RasError(f"etcd refused {path}: {_why(exc)}") from None
            if index != start:
                with self._lock:
                    self._current = index
            self.reachable = True
            return answer
        self.reachable = False
        _failures[_OPERATIONS.get(path, "other")].inc()
        raise EtcdUnavailable("no etcd member answered: " + "; ".join(failures))

    # -- key-values ---------------------------------------------------------------------------

    def get(self, key: bytes) -> KeyValue | None:
        got = self.post("kv/range", {"key": _b64(key)})
        kvs = got.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: bytes, *, keys_only: bool = False) -> list[KeyValue]:
        payload: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        payload.update(sort_order="ASCEND", sort_target="KEY")
        if keys_only:
            payload["keys_only"] = True
        got = self.post("kv/range", payload)
        return [_kv(kv) for kv in got.get("kvs", [])]

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Put; the store's revision after it."""
        body = Op.put(key, value, lease)["request_put"]
        return int(self.post("kv/put", body)["header"]["revision"])

    def delete(self, key: bytes) -> bool:
        return int(self.post("kv/deleterange", {"key": _b64(key)}).get("deleted", 0)) > 0

    def delete_prefix(self, prefix: bytes) -> int:
        got = self.post(
            "kv/deleterange", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        )
        return int(got.get("deleted", 0))

    def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> TxnResult:
        got = self.post(
            "kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)}
        )
        return TxnResult(
            bool(got.get("succeeded", False)),
            int(got["header"]["revision"]),
            list(got.get("responses", [])),
        )

    def revision(self) -> int:
        """The cluster's current revision (a linearizable read)."""
        got = self.post("kv/range", {"key": _b64(b"\x00"), "count_only": True})
        return int(got["header"]["revision"])

    # -- leases -------------------------------------------------------------------------------

    def grant(self, ttl_s: int) -> int:
        return int(self.post("lease/grant", {"TTL": str(ttl_s), "ID": "0"})["ID"])

    def keep_alive(self, lease: int) -> int:
        """Refresh ``lease``; its remaining TTL (0 or less: it has expired)."""
        try:
            got = self.post("lease/keepalive", {"ID": str(lease)})
        except EtcdUnavailable:
            raise
        except RasError as exc:
            if "not found" in str(exc):
                return 0
            raise
        return int(got.get("result", got).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.post("kv/lease/revoke", {"ID": str(lease)})


def _why(exc: Etcd3Exception) -> str:
    detail = exc.detail_text or ""
    return (detail.strip() or type(exc).__name__)[:300]
