"""Schemathesis hooks for tests/api_fuzz.rs (loaded through SCHEMATHESIS_HOOKS).

The membership changes and the raw event log are fuzzed with malformed input only
(schemathesis.toml), but schemathesis still sends a well-formed case now and then: one whose only
flaw was a header, or a check's re-send. Carried out with the real token, such a case removed
node 1 from the Raft group in the middle of the run. Just before every request, these hooks turn
a well-formed request to those endpoints into a harmless one that is still well-formed, so that
the checks judge the same kind of answer:

- DELETE /members/{node_id} of a node that may exist (ids below 100) asks for node 4000 + id,
  which is not a member (409);
- POST /members with a body of the AddMember shape gets node_id 0 (refused with 400);
- POST /events with a body of the Event shape sends a stale lease renewal instead (committed as a
  no-op).
"""

import json
import os

import jsonschema_rs
import schemathesis

_SPEC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "api", "openapi.json")
with open(_SPEC_PATH, encoding="utf-8") as spec_file:
    _COMPONENTS = json.load(spec_file)["components"]


def _validator(name):
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": _COMPONENTS})


_ADD_MEMBER = _validator("AddMember")
_EVENT = _validator("Event")
_STALE_EVENT = {"LeaseRenewed": {"primary": 0, "generation": 0}}


def _is_valid(validator, body):
    try:
        return validator.is_valid(body)
    except (TypeError, ValueError):  # not JSON-like at all (raw bytes, no body)
        return False


def _may_be_member(value):
    text = str(value)
    digits = text[1:] if text.startswith("+") else text
    return digits.isascii() and digits.isdigit() and int(digits) < 100


@schemathesis.hook
def before_call(context, case, kwargs):
    method = case.operation.method.upper()
    path = case.operation.path
    if method == "DELETE" and path == "/members/{node_id}":
        node_id = (case.path_parameters or {}).get("node_id")
        if node_id is not None and _may_be_member(node_id):
            case.path_parameters["node_id"] = 4000 + int(str(node_id).lstrip("+"))
    elif method == "POST" and path == "/members":
        if isinstance(case.body, dict) and _is_valid(_ADD_MEMBER, case.body):
            case.body["node_id"] = 0
    elif method == "POST" and path == "/events":
        if _is_valid(_EVENT, case.body):
            case.body = dict(_STALE_EVENT)
