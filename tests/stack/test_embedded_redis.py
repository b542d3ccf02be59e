"""The TLS test files make_tls_files writes: a CA, and server and client certificates that
pass a strict handshake both ways (no redis-server needed: the handshake runs in memory)."""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

import pytest

from contract.errors import TlsUnsupported
from stack.embedded_redis import TlsFiles, make_tls_files


def context(files: TlsFiles, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    cert, key = (
        (files.server_cert, files.server_key) if server else (files.client_cert, files.client_key)
    )
    ctx.load_verify_locations(files.ca_cert)
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # What Python 3.13 sets by default, asked for on every version.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, host: str) -> ssl.SSLObject:
    """Both ends of a TLS handshake through memory; the server's end, once it is done."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=host)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return server
    raise AssertionError(f"handshake did not finish: {done}")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls") / "new")


def test_the_files_are_pem_where_the_tls_tests_look_for_them(files: TlsFiles) -> None:
    directory = files.ca_cert.parent
    assert [
        files.ca_cert,
        files.server_cert,
        files.server_key,
        files.client_cert,
        files.client_key,
    ] == [directory / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")]
    for cert in (files.ca_cert, files.server_cert, files.client_cert):
        assert cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    for key in (files.server_key, files.client_key):
        assert "PRIVATE KEY-----" in key.read_text().splitlines()[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_server_and_client_certificates_verify_each_other(files: TlsFiles, host: str) -> None:
    server_ctx, client_ctx = context(files, server=True), context(files, server=False)
    server = handshake(client_ctx, server_ctx, host)
    peer = server.getpeercert()
    assert peer is not None
    assert ("commonName", "inference-client") in [rdn[0] for rdn in peer["subject"]]


def test_the_server_certificate_does_not_pass_for_another_host(files: TlsFiles) -> None:
    server_ctx, client_ctx = context(files, server=True), context(files, server=False)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(client_ctx, server_ctx, "10.1.2.3")


def test_without_trustme_tls_is_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the demo runs: the embedded extra without the dev extra.
    monkeypatch.setitem(sys.modules, "trustme", None)
    with pytest.raises(TlsUnsupported, match="trustme"):
        make_tls_files(tmp_path)
    assert not list(tmp_path.iterdir())
