"""The request schemas and load_body: what a view gets, and what never reaches one."""
import pytest
from marshmallow import ValidationError

from app.api.errors import ApiError
from app.api.schemas import AddPeerSchema, ConnectSchema, EmptySchema, load_body
from tests.conftest import BRIDGE_KEY, SERVER_KEY, FakeHelper, make_key


def load(app, schema, body, content_type="application/json"):
    with app.test_request_context("/", method="POST", data=body, content_type=content_type):
        return load_body(schema)


@pytest.mark.parametrize("body", [b"", b"  \n", b"{}"])
def test_an_absent_or_empty_body_is_an_empty_object(app, body):
    assert load(app, EmptySchema(), body) == {}


@pytest.mark.parametrize("body,message", [
    (b"{", "Malformed JSON body"),
    (b'{"publicKey": NaN}', "Malformed JSON body"),  # not JSON, though Python's parser takes it
    (b"[" * 5000 + b"]" * 5000, "Malformed JSON body"),  # deeper than the parser recurses
    (b"[]", "The JSON body must be an object"),
    (b'"text"', "The JSON body must be an object"),
])
def test_a_body_that_is_not_a_json_object_is_refused(app, body, message):
    with pytest.raises(ApiError) as info:
        load(app, EmptySchema(), body)
    assert (info.value.code, info.value.message) == ("VALIDATION_ERROR", message)


def test_connect_fields(app):
    schema = ConnectSchema()
    assert load(app, schema, b'{"publicKey": "%s"}' % make_key(1).encode()) == {"publicKey": make_key(1),
                                                                                "force_direct": False}
    for bad in ({"publicKey": "AAAA"}, {"publicKey": make_key(1), "force_direct": "true"},
                {"publicKey": make_key(1), "force_direct": 1}, {"publicKey": make_key(1), "exitServerId": "a b"},
                {"publicKey": make_key(1), "other": 1}, {}):
        with app.app_context(), pytest.raises(ValidationError):
            schema.load(bad)


def add_peer(**changes):
    body = {"userUuid": "orb-1", "publicKey": make_key(1), "assignedIP": "10.8.0.42", "allowedIPs": "10.8.0.42/32"}
    body.update(changes)
    return body


def test_add_peer_address_must_be_a_client_address_of_the_pool(app):
    schema = AddPeerSchema()
    with app.app_context():
        loaded = schema.load(add_peer(allowedIPs=" 10.8.0.42/32 ", endpoint="[2001:db8::7]:51820"))
        assert (loaded["assignedIP"], loaded["endpoint"], loaded["noKeepalive"]) == \
            ("10.8.0.42", "[2001:db8::7]:51820", False)
        for changes, field in [({"assignedIP": "10.9.0.42", "allowedIPs": "10.9.0.42/32"}, "assignedIP"),
                               ({"assignedIP": "10.8.0.1", "allowedIPs": "10.8.0.1/32"}, "assignedIP"),  # gateway
                               ({"assignedIP": "10.8.255.255", "allowedIPs": "10.8.255.255/32"}, "assignedIP"),
                               ({"assignedIP": "host.example"}, "assignedIP"),
                               ({"allowedIPs": "10.8.0.43/32"}, "allowedIPs"),
                               ({"allowedIPs": "10.8.0.42/32, 10.8.0.43/32"}, "allowedIPs"),
                               ({"allowedIPs": "nope"}, "allowedIPs"),
                               ({"endpoint": "host.example:51820"}, "endpoint"),
                               ({"endpoint": "2001:db8::7:51820"}, "endpoint")]:
            with pytest.raises(ValidationError) as info:
                schema.load(add_peer(**changes))
            assert field in info.value.messages, (changes, info.value.messages)


def test_validation_asks_the_helper_nothing(app, fake_helper):
    """The server's own keys have a key's form, so the schemas pass them (the connect and the add-peer refuse
    them from the hello the worker holds: tests/app/api/test_wireguard.py); an IPv6 entry is only parsed."""
    fake_helper.calls.clear()
    with app.app_context():
        for key in (SERVER_KEY, BRIDGE_KEY):
            assert ConnectSchema().load({"publicKey": key})["publicKey"] == key
        loaded = AddPeerSchema().load(add_peer(allowedIPs="10.8.0.42/32, fd00:8::2a/128"))
        assert [str(net) for net in loaded["allowedIPs6"]] == ["fd00:8::2a/128"]
        with pytest.raises(ValidationError):  # the schema still refuses what is not a key's form
            ConnectSchema().load({"publicKey": "AAAA"})
    assert fake_helper.calls == []
    fresh = FakeHelper()
    fresh.own_keys()  # the control: asking for the keys is a hello the fake records
    assert fresh.calls == [("hello",)]
