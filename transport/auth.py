"""HMAC challenge-response over the cluster token: each side proves it holds the token by a MAC
over both fresh nonces; the token itself never crosses the wire."""

from __future__ import annotations

import hashlib
import hmac
import os

NONCE_BYTES = 16


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(token: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """``role`` (b"client"/b"server") separates the two directions, so a proof cannot be
    reflected back."""
    return hmac.new(token, b"kvmesh-auth-v1|" + role + b"|" + client_nonce + server_nonce,
                    hashlib.sha256).digest()


def verify(expected: bytes, given: object) -> bool:
    return isinstance(given, bytes) and hmac.compare_digest(expected, given)
