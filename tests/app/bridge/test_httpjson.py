"""JSON over HTTP(S) with one deadline for the whole call (app/bridge/httpjson.py), against loopback stubs."""
import pytest

from app.bridge import httpjson
from tests.app.bridge.exitstub import SlowExit
from tests.e2e.deploy_stack import make_tls


@pytest.fixture
def stubs():
    made = []

    def make(**kwargs):
        stub = SlowExit(**kwargs)
        made.append(stub)
        return stub
    yield make
    for stub in made:
        stub.stop()


def test_a_slow_drip_is_cut_at_the_deadline(stubs):
    """One byte every 0.5 s keeps every read under a per-read timeout; the whole call still ends."""
    fast, slow = stubs(interval=0), stubs(interval=0.5)
    assert httpjson.request("POST", fast.url + "/x", 5, {"a": 1}, "key-0123456789abcdef")[0] == 200  # control
    with pytest.raises(OSError, match="no complete answer within 1 s"):
        httpjson.request("POST", slow.url + "/wireguard/remove-peer", 1, {"a": 1}, "key-0123456789abcdef")
    assert slow.received.is_set() and not slow.finished.is_set()  # it gave up while the stub was still talking


def test_https_needs_a_certificate_that_chains_to_the_ca(stubs, tmp_path):
    ca, cert, key = make_tls(tmp_path, ip="127.0.0.1")
    stub = stubs(interval=0, tls=(str(cert), str(key)))
    status, body = httpjson.request("GET", stub.url + "/health", 5, context=httpjson.tls_context(str(ca)))
    assert status == 200 and body["success"] is True
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        httpjson.request("GET", stub.url + "/health", 5)  # the system's CAs do not know the test CA


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "http://", "http://127.0.0.1:99999/", "not a url"])
def test_bad_urls_are_oserrors(url):
    with pytest.raises(OSError):
        httpjson.request("GET", url, 1)
