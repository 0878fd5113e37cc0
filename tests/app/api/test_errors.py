"""The one error envelope, for the framework's own errors and for unexpected failures."""
import pytest

from app import failures
from app.api.errors import CODES
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


def subclasses(cls):
    return {cls} | {sub for child in cls.__subclasses__() for sub in subclasses(child)}


def undocumented(classes):
    return sorted(cls.__name__ for cls in classes if cls.code not in CODES)


def test_every_domain_failure_names_a_code_the_edge_knows():
    domain = {cls for cls in subclasses(failures.Failure) if cls.__module__ == "app.failures"}
    assert len(domain) > 10 and undocumented(domain) == []
    stray = type("Stray", (failures.Failure,), {"code": "NO_SUCH_CODE"})  # the control
    assert undocumented(domain | {stray}) == ["Stray"]


@pytest.mark.parametrize("failure,status", [
    (failures.Conflict("This public key is already registered to another peer"), 409),
    (failures.DeviceLimit("This user already has 1 devices connected to this server"), 403),
    (failures.PoolExhausted("No free addresses left in the pool"), 503),
    (failures.BridgeUnavailable("Exit server exit-1 cannot be reached"), 502),
    (failures.HelperFailed({"code": "COMMAND_FAILED", "message": "wg exited 1", "details": {"command": "wg"}}), 502),
    (failures.InvalidInput.field("publicKey", "Must be a WireGuard key"), 400),
])
def test_domain_failures_become_the_envelope_at_the_edge(client, auth, monkeypatch, failure, status):
    """The domain raises its own errors, with no HTTP; the edge gives each its status and the one envelope."""
    def refuse(*args, **kwargs):
        raise failure
    monkeypatch.setattr("app.peers.lifecycle.connect_device", refuse)
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
    assert response.status_code == status
    error = {"code": failure.code, "message": failure.message}
    if failure.details:
        error["details"] = failure.details
    assert response.get_json() == {"success": False, "error": error}
