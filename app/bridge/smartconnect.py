"""SmartConnect: whether a connect without exitServerId should be bridged.

The policy is a JSON file (ORBMESH_SMARTCONNECT_POLICY)::

    {"rules": [
        {"networks": ["198.51.100.0/24", "2001:db8::/32"], "exits": ["de-fra-1", "nl-ams-2"]},
        {"networks": ["0.0.0.0/0"], "exits": []}
    ]}

The first rule whose networks hold the client's address decides; of its
exits, the first one that is in the registry and whose /health answers
healthy or degraded is recommended.  No matching rule, an empty list, or no
healthy exit: direct.  ``force_direct`` always wins.  The client's address
is the socket peer, or X-Real-IP from a trusted proxy (app/ops/logs.py).
A policy file that does not validate stops the app at start.
"""
import ipaddress
import json
import logging

from marshmallow import Schema, ValidationError, fields, validate

from wghelper.validate import IDENTIFIER_RE

from ..config import ConfigError

log = logging.getLogger(__name__)


class Network(fields.String):
    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValidationError("Must be a network in CIDR form.") from None


class RuleSchema(Schema):
    networks = fields.List(Network(), required=True, validate=validate.Length(min=1, max=4096))
    exits = fields.List(fields.String(validate=validate.Regexp(IDENTIFIER_RE)), required=True,
                        validate=validate.Length(max=64))


class PolicySchema(Schema):
    rules = fields.List(fields.Nested(RuleSchema), required=True, validate=validate.Length(max=4096))


def load_policy(path):
    """The policy's rules, [] without a file; ConfigError naming what is wrong."""
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise ConfigError("ORBMESH_SMARTCONNECT_POLICY: cannot read %s (%s)" % (path, exc.strerror)) from None
    except ValueError as exc:
        raise ConfigError("ORBMESH_SMARTCONNECT_POLICY: %s is not JSON (%s)" % (path, exc)) from None
    try:
        return PolicySchema().load(document if isinstance(document, dict) else {})["rules"]
    except ValidationError as exc:
        raise ConfigError("ORBMESH_SMARTCONNECT_POLICY: %s: %s" % (path, exc.messages)) from None


def recommend(rules, client_address, registry, healthy):
    """The exit to bridge `client_address` to, or None for direct."""
    try:
        address = ipaddress.ip_address(client_address)
    except ValueError:
        return None
    for rule in rules:
        if any(address.version == net.version and address in net for net in rule["networks"]):
            for exit_id in rule["exits"]:
                exit = registry.get(exit_id)
                if exit is not None and healthy(exit):
                    return exit
            return None
    return None


def init_app(app):
    rules = load_policy(app.config["SMARTCONNECT_POLICY"])
    app.extensions["orbmesh_smartconnect"] = rules
    if rules:
        log.info("smartconnect: %d rules from %s", len(rules), app.config["SMARTCONNECT_POLICY"])
