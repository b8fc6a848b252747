"""The switch's verify (the agent's) and the leader's confirm at a server that wants client
certificates (review s66 logs L2): the probe presents none, the server ends the connection
after the TLS handshake without an answer, and the reason said "not an HTTP answer
(RemoteDisconnected)". Now it says what the workstation tool says of such a port: no answer
without a client certificate, a port that wants client certificates. Told by the server's
CertificateRequest (ssl's message callback) or TLS 1.3's alert certificate_required, never
guessed: a server that asks for none and ends the connection so is not said to want one.
Against a real reference server (``require_client_cert``) and, for the other endings (a reset,
no certificate asked), the tests' tiny TLS servers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import IssuedCert
from tests.refserver_helper import RefServer
from tests.test_httpcheck import APP, NOTHING, OK_CLOSE, tiny_server
from tlsroll import pki, probe, tls

WANTS = "no answer without a client certificate: a port that wants client certificates"


async def test_a_server_that_wants_client_certificates_is_said_to(
    tmp_path: Path, loopback: Callable[[], str], issue_cert: Callable[..., IssuedCert]
) -> None:
    address = loopback()
    cert = issue_cert(address, "node2")
    ca_pem = cert.ca_file.read_bytes()
    fingerprint = pki.fingerprint(pki.read_cert(cert.cert_file))
    server = RefServer(
        tmp_path / "rs",
        address,
        listen=["https"],
        cert_file=cert.cert_file,
        key_file=cert.key_file,
        client_ca_file=cert.ca_file,
        require_client_cert=True,
    )
    try:
        server.start()
        problem = await probe.check_https(address, 8443, server.app_path, ca_pem, fingerprint)
    finally:
        server.close()
    url = f"https://{address}:8443{server.app_path}"
    assert problem is not None and problem.startswith(f"{url}: {WANTS}"), problem
    assert "not an HTTP answer" not in problem


async def test_other_servers_that_give_no_answer_are_not_said_to_want_a_certificate(
    loopback: Callable[[], str], issue_cert: Callable[..., IssuedCert]
) -> None:
    address = loopback()
    cert = issue_cert(address)
    ca_pem = cert.ca_file.read_bytes()
    required = tls.server_context(cert.cert_file, cert.key_file, cert.ca_file, require_client=True)
    with tiny_server(address, OK_CLOSE, required) as port:  # Python's ssl: a reset, or the alert
        problem = await probe.check_https(address, port, APP, ca_pem, None)
        assert problem is not None and WANTS in problem, problem
    optional = tls.server_context(cert.cert_file, cert.key_file, cert.ca_file)
    with tiny_server(address, OK_CLOSE, optional) as port:  # asks, takes none, answers: fine
        assert await probe.check_https(address, port, APP, ca_pem, None) is None
    with tiny_server(address, NOTHING, tls.server_context(cert.cert_file, cert.key_file)) as port:
        problem = await probe.check_https(address, port, APP, ca_pem, None)  # asks none, ends
        assert problem is not None and "client certificate" not in problem, problem
