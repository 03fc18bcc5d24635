"""The farm's PKI: a CA for the daemons, certificates, CSRs, import/export, TLS contexts.

The farm CA (:class:`FarmPKI`, :func:`create_ca`) issues every daemon a certificate for both
TLS server and client use (:func:`issue_certificate`), so that broker, gateways and agents
authenticate each other by mutual TLS and the broker knows who is talking from
:func:`peer_name`. The public certificate of gateways and HALB is self-signed by default
(:func:`self_signed_certificate`), or imported (:func:`import_pem`, :func:`import_pfx`), or
signed by another CA from a request (:func:`make_csr`). :mod:`ras.pki.tls` makes the
``ssl`` contexts. Every error is a :class:`ras.errors.PKIError`.
"""

from ras.pki._bundle import export_pfx, import_pem, import_pfx
from ras.pki._common import KeyPair, split_chain
from ras.pki._store import FarmPKI, write_atomic, write_key_pair
from ras.pki._x509 import (
    create_ca,
    describe,
    issue_certificate,
    make_csr,
    peer_name,
    self_signed_certificate,
)
from ras.pki.tls import client_context, server_context

__all__ = [
    "FarmPKI",
    "KeyPair",
    "client_context",
    "create_ca",
    "describe",
    "export_pfx",
    "import_pem",
    "import_pfx",
    "issue_certificate",
    "make_csr",
    "peer_name",
    "self_signed_certificate",
    "server_context",
    "split_chain",
    "write_atomic",
    "write_key_pair",
]
