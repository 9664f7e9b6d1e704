"""HTTPS on the router (vLLM's --ssl-* flags), with real processes on loopback: `kvmesh up` on a
self-signed certificate, its own workers and memory server joining over HTTPS; and a router that
requires client certificates."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.launch import probe
from services.runtime.auth import DEV_CLUSTER_TOKEN
from tests.launcher.up_process import REPO, cleanup, free_port, start_up, wait_gone, wait_manifest

REFUSED = (OSError, http.client.HTTPException)  # urllib's URLError and ssl.SSLError are OSErrors


def _get_json(url: str, context: ssl.SSLContext | None) -> dict:
    with urllib.request.urlopen(url, context=context, timeout=5) as resp:
        return json.loads(resp.read())


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files of a self-signed certificate for 127.0.0.1, as `openssl req -x509` makes."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvmesh test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_up_serves_https_on_a_self_signed_certificate_and_its_cluster_joins_over_it(tmp_path, monkeypatch):
    cert, key = _self_signed(tmp_path)
    port = free_port()
    # 32 local blocks of 16 tokens: the long prompt below spills to the memory server, which
    # registered with the router over HTTPS
    proc = start_up(tmp_path / "logs", "--port", str(port), "--memservers", "1", "--memserver-capacity", "8MiB",
                    "--worker-kv-blocks", "32", "--worker-threads", "1", "--stop-timeout", "20",
                    "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    with cleanup(proc, tmp_path / "logs"):
        manifest = wait_manifest(proc, tmp_path / "logs")
        url = manifest["url"]
        assert url == f"https://127.0.0.1:{port}"
        with pytest.raises(REFUSED):  # plain HTTP to the TLS port gets no answer
            _get_json(f"http://127.0.0.1:{port}/health", None)
        with pytest.raises(REFUSED, match="CERTIFICATE_VERIFY_FAILED"):  # not trusted by default
            _get_json(url + "/health", ssl.create_default_context())

        trusting = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert)), timeout=60)
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, http_client=trusting) as client:
            stream = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12, stream=True)
            assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            # longer than the worker's 512 local tokens: served only with blocks on the memory server
            long = client.completions.create(model="tiny", prompt="word " * 700, max_tokens=4)
            assert long.usage.prompt_tokens > 32 * 16 and long.choices[0].text

        trust = tmp_path / "logs" / "router-trust.pem"  # what the summary tells `kvmesh chat` to trust
        chat = subprocess.run([sys.executable, "-m", "services.cli", "chat", "--url", url, "--ca-certs", str(trust),
                               "--prompt", "hi", "--max-tokens", "4"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert "[ttft " in chat.stderr and chat.stdout.strip()  # an answer streamed over HTTPS

        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the probes below are urllib's
        view = probe.cluster_view(url, DEV_CLUSTER_TOKEN)
        assert view.num_memservers == 1
        assert probe.wait_zero_used_blocks(url, DEV_CLUSTER_TOKEN).num_used_blocks == 0

        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
        out, _ = proc.communicate()
        assert wait_gone([p["pid"] for p in manifest["processes"]]) == []
    assert f"kvmesh chat --url {url} --ca-certs {trust}" in out


@pytest.fixture
def router_requiring_client_certs(tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    port = free_port()
    with open(tmp_path / "router.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "router", "--port", str(port), "--ssl-certfile", str(paths["cert"]),
             "--ssl-keyfile", str(paths["key"]), "--ssl-ca-certs", str(paths["ca"]), "--ssl-cert-reqs", "2"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not probe.port_is_open("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, "router did not start"
            time.sleep(0.05)
        yield f"https://127.0.0.1:{port}", ca
    finally:
        proc.terminate()
        proc.wait(30)


def test_router_with_cert_reqs_2_serves_only_clients_with_a_certificate_of_its_ca(router_requiring_client_certs):
    url, ca = router_requiring_client_certs
    client_cert = ca.issue_cert("client@example.com")
    with_cert = ssl.create_default_context()
    ca.configure_trust(with_cert)
    client_cert.configure_cert(with_cert)
    assert _get_json(url + "/health", with_cert) == {"status": "ok"}

    without_cert = ssl.create_default_context()
    ca.configure_trust(without_cert)
    with pytest.raises(REFUSED):  # the handshake fails (TLS 1.3: on the first read)
        _get_json(url + "/health", without_cert)

    stranger = ssl.create_default_context()  # a certificate from another CA
    ca.configure_trust(stranger)
    trustme.CA().issue_cert("client@example.com").configure_cert(stranger)
    with pytest.raises(REFUSED):
        _get_json(url + "/health", stranger)
    # the refusals disturbed nothing
    assert _get_json(url + "/health", with_cert) == {"status": "ok"}
