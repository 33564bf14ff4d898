"""The client's own HTTP/1.1 data path over TLS, against uvicorn serving https."""

import shutil
import subprocess

import numpy as np
import pytest
from conftest import ServerHandle

from ndrelay import ConnectError, Relay, RelayClient

pytestmark = pytest.mark.e2e


@pytest.fixture
def tls_server(tmp_path):
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test certificate (CI installs it)"
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    handle = ServerHandle(Relay(), ssl_keyfile=str(key), ssl_certfile=str(cert))
    yield handle, str(cert)
    handle.stop()


def test_publish_and_stream_over_https(tls_server):
    handle, cert = tls_server
    url = handle.url.replace("http://", "https://")
    big = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: the large-payload path
    items = [np.full(3, i, np.int16) for i in range(5)] + [big, b"raw bytes"]
    with RelayClient(url, verify=cert, read_timeout=10) as client:
        answer = client.publish("tls", items)
        assert (answer["accepted"], answer["items"], answer["next_seq"]) == (8, 7, 7)
        got = list(client.stream("tls"))
    assert [int(a[0]) for a in got[:5]] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(got[5], big)
    assert got[6] == b"raw bytes"


def test_https_with_an_untrusted_certificate_fails_to_connect(tls_server):
    handle, _cert = tls_server
    url = handle.url.replace("http://", "https://")
    with RelayClient(url, read_timeout=10) as client:  # system CAs: not ours
        with pytest.raises(ConnectError, match="TLS"):
            client.stream("tls")
