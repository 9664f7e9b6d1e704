"""HTTPS for the router's listener: vLLM's --ssl-* flags, one frozen config, the server's
SSLContext, and the trust a local cluster's own clients need for a self-signed certificate."""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

# vLLM (uvicorn) takes --ssl-cert-reqs as the int of Python's ssl.VerifyMode
CERT_REQS = {0: ssl.CERT_NONE, 1: ssl.CERT_OPTIONAL, 2: ssl.CERT_REQUIRED}


@dataclass(frozen=True, slots=True)
class ServerTLS:
    certfile: str  # PEM: the certificate, then any intermediates
    keyfile: str  # PEM: its private key (unencrypted)
    ca_certs: str | None = None  # PEM: CAs that client certificates must chain to
    cert_reqs: int = 0  # 0: no client certificate asked, 1: verified if sent, 2: required

    def __post_init__(self) -> None:
        if self.cert_reqs not in CERT_REQS:
            raise ValueError(f"--ssl-cert-reqs must be 0 (none), 1 (optional) or 2 (required), got {self.cert_reqs}")
        if self.cert_reqs and not self.ca_certs:
            raise ValueError("--ssl-cert-reqs 1 or 2 verifies client certificates: give the CAs with --ssl-ca-certs")
        for flag, path in (("--ssl-certfile", self.certfile), ("--ssl-keyfile", self.keyfile),
                           ("--ssl-ca-certs", self.ca_certs)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path!r}: no such file")

    def context(self) -> ssl.SSLContext:
        """The listener's context (TLS 1.2+); a certificate that does not load is a ValueError."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.certfile, self.keyfile)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"--ssl-certfile/--ssl-keyfile: cannot load the certificate and its key ({e})") from e
        if self.ca_certs:
            try:
                ctx.load_verify_locations(cafile=self.ca_certs)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"--ssl-ca-certs {self.ca_certs!r}: not a PEM file of certificates ({e})") from e
        ctx.verify_mode = CERT_REQS[self.cert_reqs]
        return ctx


def add_server_tls_arguments(parser: argparse.ArgumentParser, whose: str = "") -> None:
    parser.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                        help=f"{whose}serve HTTPS with this private key (PEM; needs --ssl-certfile)")
    parser.add_argument("--ssl-certfile", default=None, metavar="FILE",
                        help=f"{whose}serve HTTPS with this certificate chain (PEM; needs --ssl-keyfile)")
    parser.add_argument("--ssl-ca-certs", default=None, metavar="FILE",
                        help=f"{whose}CAs that client certificates must chain to (PEM)")
    parser.add_argument("--ssl-cert-reqs", type=int, default=0, choices=sorted(CERT_REQS),
                        help=f"{whose}client certificates: 0 not asked, 1 verified when sent, 2 required")


def server_tls_from_args(args: argparse.Namespace) -> ServerTLS | None:
    """None when HTTPS is off; a ValueError that names the flag to change when the flags disagree."""
    if args.ssl_keyfile is None and args.ssl_certfile is None:
        if args.ssl_ca_certs is not None or args.ssl_cert_reqs:
            raise ValueError("--ssl-ca-certs and --ssl-cert-reqs need HTTPS: give --ssl-certfile and --ssl-keyfile")
        return None
    if args.ssl_keyfile is None or args.ssl_certfile is None:
        raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    return ServerTLS(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs, args.ssl_cert_reqs)


def write_trust_bundle(certfile: str, dest: Path) -> Path:
    """dest: the CAs this process trusts ($SSL_CERT_FILE, else OpenSSL's default file), then
    certfile, so a local cluster's own clients (workers, memory servers, the launcher's probes and
    chat) trust the router whether its certificate is self-signed or issued by a trusted CA."""
    paths = ssl.get_default_verify_paths()
    trusted = os.environ.get(paths.openssl_cafile_env) or paths.cafile
    parts = [Path(trusted).read_text()] if trusted and Path(trusted).is_file() else []
    parts.append(Path(certfile).read_text())
    dest.write_text("\n".join(p.rstrip("\n") for p in parts) + "\n")
    return dest
