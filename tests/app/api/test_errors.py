"""The one error envelope, for the framework's own errors and for unexpected failures."""
import pytest

from tests.conftest import make_key


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/nowhere", 404, "NOT_FOUND"),
    ("GET", "/wireguard/connect", 405, "METHOD_NOT_ALLOWED"),
    ("DELETE", "/wireguard/status", 405, "METHOD_NOT_ALLOWED"),
    ("PUT", "/health", 405, "METHOD_NOT_ALLOWED"),
])
def test_framework_errors_use_envelope(client, method, path, status, code):
    response = client.open(path, method=method)
    assert response.status_code == status
    body = response.get_json()
    assert body["success"] is False and body["error"]["code"] == code and body["error"]["message"]


def test_unexpected_failure_is_500_envelope_without_traceback(client, auth, app, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")
    monkeypatch.setattr("app.peers.lifecycle.connect_device", boom)
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
    assert response.status_code == 500
    assert response.get_json() == {"success": False, "error": {"code": "INTERNAL_ERROR",
                                                               "message": "Internal server error"}}
