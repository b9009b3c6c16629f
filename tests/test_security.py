"""API key and TLS against the real server process, through stock tritonclient (HTTP and gRPC,
with ``ssl=True`` and ``headers``): the key is required where it should be and nowhere else,
a wrong key is refused like a missing one, and both ports speak only TLS when given a
certificate. The certificate is made here, at test time."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import gevent.ssl
import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import make_tiny_repository
from serving import ECHO, Echo, TextSource, serving, text_array
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.slow

KEY = "s3cret-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = TextSource(seed=21)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, signed by its own key: (cert, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return make_tiny_repository(tmp_path_factory.mktemp("security-repo"), {ECHO: 2}, engine="echo", max_batch_size=16)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(repository, certificate):
    """TLS on both ports, an API key, health and metrics open (the default)."""
    cert, key = certificate
    args = ["--api-key", KEY, "--tls-certfile", str(cert), "--tls-keyfile", str(key)]
    with serving(repository, repository.parent / "security-server.log", *args, tls_ca=cert, api_key=KEY) as proc:
        yield proc


def http_client(server, cert: Path) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.http_url, ssl=True, ssl_options={"ca_certs": str(cert)}, ssl_context_factory=gevent.ssl.create_default_context)


def grpc_client(server, cert: Path) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(cert))


def text_input(module, texts: list[str]):
    tensor = module.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(text_array(texts))
    return tensor


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}], ids=["none", "wrong", "no-bearer"])
def test_http_needs_the_key_for_inference_and_metadata(server, certificate, repository, headers):
    cert, _ = certificate
    client = http_client(server, cert)
    try:
        texts = TEXTS(2)
        result = client.infer(ECHO, [text_input(httpclient, texts)], headers=dict(AUTH))
        np.testing.assert_array_equal(result.as_numpy("LOGITS"), Echo(repository).rows(texts))
        assert client.get_model_metadata(ECHO, headers=dict(AUTH))["name"] == ECHO
        fresh = lambda: dict(headers) if headers else None  # noqa: E731  (tritonclient adds to the dict it is given)
        for call in (lambda: client.infer(ECHO, [text_input(httpclient, ["no key"])], headers=fresh()), lambda: client.get_model_metadata(ECHO, headers=fresh()), lambda: client.load_model(ECHO, headers=fresh())):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "401" and "API key" in info.value.message()
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(ECHO)  # health: open
        assert client.get_inference_statistics(ECHO)["model_stats"][0]["name"] == ECHO  # statistics: metrics, open
    finally:
        client.close()
    trust = ssl.create_default_context(cafile=str(cert))
    reply = httpx.post(f"https://{server.http_url}/v1/classify", json={"model": ECHO, "inputs": ["a"]}, headers=headers, verify=trust)
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"https://{server.http_url}/metrics", verify=trust).status_code == 200


@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer wrong-key"}], ids=["none", "wrong"])
def test_grpc_needs_the_key_for_inference_and_metadata(server, certificate, repository, headers):
    cert, _ = certificate
    client = grpc_client(server, cert)
    try:
        texts = TEXTS(2)
        result = client.infer(ECHO, [text_input(grpcclient, texts)], headers={"authorization": AUTH["Authorization"]})
        np.testing.assert_array_equal(result.as_numpy("LOGITS"), Echo(repository).rows(texts))
        for call in (lambda: client.infer(ECHO, [text_input(grpcclient, ["no key"])], headers=headers), lambda: client.get_model_metadata(ECHO, headers=headers)):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.UNAUTHENTICATED" and "API key" in info.value.message()
        assert client.is_server_live() and client.is_model_ready(ECHO)  # health: open
        errors, results = [], []
        client.start_stream(callback=lambda result, error: errors.append(error) if error else results.append(result), headers=headers)
        try:
            client.async_stream_infer(ECHO, [text_input(grpcclient, ["no key"])])
        except InferenceServerException:
            pass  # the stream was refused before this request could be sent
        client.stop_stream()  # its refusal has reached the callback
        assert not results and errors and "UNAUTHENTICATED" in str(errors[0])
        client.start_stream(callback=lambda result, error: errors.append(error) if error else results.append(result), headers={"authorization": AUTH["Authorization"]})
        client.async_stream_infer(ECHO, [text_input(grpcclient, texts)])
        client.stop_stream()
        assert len(results) == 1
        np.testing.assert_array_equal(results[0].as_numpy("LOGITS"), Echo(repository).rows(texts))
    finally:
        client.close()


def test_both_ports_speak_only_tls(server, certificate):
    cert, _ = certificate
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{server.http_url}/v2/health/live")
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
        httpx.get(f"https://{server.http_url}/v2/health/live")
    with grpc.insecure_channel(server.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    context = ssl.create_default_context(cafile=str(cert))
    assert httpx.get(f"https://{server.http_url}/v2/health/live", verify=context).status_code == 200


def test_key_from_the_environment_and_nothing_open(repository, tmp_path, monkeypatch):
    """MUXSERVE_API_KEY sets the key; --open-endpoints '' leaves even health behind it."""
    monkeypatch.setenv("MUXSERVE_API_KEY", KEY)
    with serving(repository, tmp_path / "env-key.log", "--open-endpoints", "", api_key=KEY) as server:
        base = f"http://{server.http_url}"
        for path in ("/v2/health/ready", "/metrics", "/v2"):
            assert httpx.get(base + path).status_code == 401
            assert httpx.get(base + path, headers=AUTH).status_code == 200
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.is_server_live()
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            assert client.is_server_live(headers={"authorization": AUTH["Authorization"]})
        finally:
            client.close()


def test_unknown_endpoint_group_is_refused_at_start(repository, tmp_path):
    with pytest.raises(RuntimeError, match="unknown endpoint groups"):
        with serving(repository, tmp_path / "bad-groups.log", "--open-endpoints", "health,everything"):
            pass
