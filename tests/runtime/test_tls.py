"""The router's --ssl-* flags: what is refused before anything listens, and with which message."""

from __future__ import annotations

import argparse
import ssl
import subprocess
import sys

import pytest
import trustme

from services.launch.config import LaunchConfig
from services.runtime.ports import free_port
from services.runtime.tls import ServerTLS, add_server_tls_arguments, server_tls_from_args, write_trust_bundle


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 it issued, and an unrelated key."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(d / "cert.pem")
    server.private_key_pem.write_to_path(d / "key.pem")
    ca.cert_pem.write_to_path(d / "ca.pem")
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(d / "other-key.pem")
    return d


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_tls_arguments(parser)
    return parser.parse_args(argv)


def test_no_ssl_flags_is_plain_http():
    assert server_tls_from_args(_parse()) is None


@pytest.mark.parametrize("argv, message", [
    (("--ssl-keyfile", "{d}/key.pem"), "both --ssl-certfile and --ssl-keyfile"),
    (("--ssl-certfile", "{d}/cert.pem"), "both --ssl-certfile and --ssl-keyfile"),
    (("--ssl-ca-certs", "{d}/ca.pem"), "need HTTPS"),
    (("--ssl-certfile", "{d}/cert.pem", "--ssl-keyfile", "{d}/key.pem", "--ssl-cert-reqs", "2"), "--ssl-ca-certs"),
    (("--ssl-certfile", "{d}/nope.pem", "--ssl-keyfile", "{d}/key.pem"), "--ssl-certfile '.*nope.pem': no such file"),
    (("--ssl-certfile", "{d}/cert.pem", "--ssl-keyfile", "{d}/key.pem", "--ssl-ca-certs", "{d}/nope.pem",
      "--ssl-cert-reqs", "1"), "--ssl-ca-certs '.*nope.pem': no such file"),
])
def test_flags_that_disagree_are_refused_naming_the_flag(pki, argv, message):
    with pytest.raises(ValueError, match=message):
        server_tls_from_args(_parse(*(a.format(d=pki) for a in argv)))


def test_cert_reqs_outside_0_1_2_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parse("--ssl-cert-reqs", "3")
    assert "invalid choice" in capsys.readouterr().err


def test_a_key_that_is_not_the_certificates_is_refused(pki):
    tls = ServerTLS(str(pki / "cert.pem"), str(pki / "other-key.pem"))
    with pytest.raises(ValueError, match="cannot load the certificate and its key"):
        tls.context()


def test_context_asks_for_client_certificates_as_told(pki):
    assert ServerTLS(str(pki / "cert.pem"), str(pki / "key.pem")).context().verify_mode == ssl.CERT_NONE
    required = ServerTLS(str(pki / "cert.pem"), str(pki / "key.pem"), str(pki / "ca.pem"), 2).context()
    assert required.verify_mode == ssl.CERT_REQUIRED
    assert required.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_router_exits_2_on_bad_ssl_flags_before_listening(pki):
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "services.cli", "router", "--port", str(port),
                           "--ssl-certfile", str(pki / "cert.pem"), "--ssl-keyfile", str(pki / "other-key.pem")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot load the certificate and its key" in done.stdout + done.stderr


def test_kvmesh_up_refuses_required_client_certificates(pki):
    tls = ServerTLS(str(pki / "cert.pem"), str(pki / "key.pem"), str(pki / "ca.pem"), 2)
    with pytest.raises(ValueError, match="present no client certificate"):
        LaunchConfig(cluster_token="t", tls=tls)
    LaunchConfig(cluster_token="t", tls=ServerTLS(str(pki / "cert.pem"), str(pki / "key.pem"), str(pki / "ca.pem"), 1))
    with pytest.raises(ValueError, match="cannot load the certificate and its key"):
        LaunchConfig(cluster_token="t", tls=ServerTLS(str(pki / "cert.pem"), str(pki / "other-key.pem")))


def test_trust_bundle_keeps_the_trusted_cas_and_adds_the_certificate(pki, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    bundle = write_trust_bundle(str(pki / "cert.pem"), tmp_path / "trust.pem").read_text()
    assert (pki / "ca.pem").read_text().strip() in bundle
    assert (pki / "cert.pem").read_text().strip() in bundle
    ssl.create_default_context(cafile=str(tmp_path / "trust.pem"))  # a PEM file OpenSSL loads
