"""Typed transport errors. Raised, chained with ``from e``, never swallowed."""

from __future__ import annotations


class TransportError(Exception):
    """Base of every error the transport raises."""


class PeerUnreachable(TransportError):
    """The peer could not be reached, died, closed the connection or went silent."""


class TransferTimeout(TransportError):
    """A request did not complete before its deadline."""


class WireDecodeError(TransportError):
    """Bytes on the wire do not form a valid message (bad msgpack, unknown type or version,
    oversized header, frames not matching the header).

    ``request_id``/``is_request``/``frame_sizes``/``inline`` are set when the envelope itself was
    readable, so the receiver can still answer the request and drain its (tagged) frames.
    """

    def __init__(self, message: str, *, request_id: int | None = None, is_request: bool = False,
                 frame_sizes: tuple[int, ...] = (), inline: tuple | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.is_request = is_request
        self.frame_sizes = frame_sizes
        self.inline = inline  # frames that came inside the header (nothing to drain for them)


class RemoteError(TransportError):
    """The peer answered a request with an error (its handler raised, or it refused the request)."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(f"{code}: {message}")
        self.message = message
        self.code = code
