"""What the output must look like: OpenAI's `response_format` or vLLM's `structured_outputs`
extension, turned into the grammar the engine constrains the tokens to."""

from __future__ import annotations

import json

from loragate.engine.errors import InvalidRequestError
from loragate.engine.structured_output import (grammar_from_choice, grammar_from_json_schema, grammar_from_lark,
                                               grammar_from_regex)


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param)


# vLLM's names for structured_outputs' fields before v0.10.2 (guided_json, ...), which many
# clients still send: silently ignoring them would answer unconstrained.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def output_grammar(body: dict) -> str | None:
    """The grammar the output must match (None: free text): OpenAI's response_format, or
    vLLM's structured_outputs extension (one of json, regex, choice, grammar; or its earlier
    guided_* fields). vLLM's guided_decoding_backend only picks its grammar library: ignored."""
    fmt = body.get("response_format") or {"type": "text"}
    extension = body.get("structured_outputs")
    if not isinstance(fmt, dict):
        raise _bad("'response_format' must be an object", "response_format")
    if extension is not None and not isinstance(extension, dict):
        raise _bad("'structured_outputs' must be an object", "structured_outputs")
    if body.get("guided_whitespace_pattern") is not None:
        raise _bad("'guided_whitespace_pattern' is not supported", "guided_whitespace_pattern")
    guided = {field: body[name] for name, field in _GUIDED.items() if body.get(name) is not None}
    if guided:
        if extension is not None:
            raise _bad("give 'structured_outputs' or the guided_* fields, not both", "structured_outputs")
        extension = guided
    if extension is not None:
        if fmt.get("type") != "text":
            raise _bad("give 'response_format' or 'structured_outputs', not both", "structured_outputs")
        return _structured_outputs(extension)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar_from_json_schema(None)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise _bad("'response_format.json_schema' must be an object with a 'schema' object", "response_format")
        return grammar_from_json_schema(spec.get("schema", {}))
    raise _bad("'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")


def _structured_outputs(spec: dict) -> str:
    given = [k for k in ("json", "regex", "choice", "grammar") if spec.get(k) is not None]
    if len(given) != 1:
        raise _bad("'structured_outputs' takes exactly one of 'json', 'regex', 'choice', 'grammar'",
                   "structured_outputs")
    kind, value = given[0], spec[given[0]]
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise _bad(f"'structured_outputs.json' is not valid JSON: {e}", "structured_outputs") from None
        if not isinstance(value, (dict, bool)):
            raise _bad("'structured_outputs.json' must be a JSON schema object", "structured_outputs")
        return grammar_from_json_schema(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise _bad("'structured_outputs.choice' must be a non-empty list of non-empty strings",
                       "structured_outputs")
        return grammar_from_choice(value)
    if not isinstance(value, str) or not value:
        raise _bad(f"'structured_outputs.{kind}' must be a non-empty string", "structured_outputs")
    return grammar_from_regex(value) if kind == "regex" else grammar_from_lark(value)
