"""The batch API's file formats: checking an uploaded JSONL file, splitting a batch's input
file into request lines, and the lines of the output and error files (OpenAI's shapes).

An input line is `{"custom_id": ..., "method": "POST", "url": <the batch's endpoint>,
"body": {...}}`. A line that cannot be sent at all (bad JSON, no or duplicate custom_id, wrong
method or url, streaming) becomes an error-file line with `error: {code, message, line}` and
the other lines still run. A request the endpoint refuses is an error-file line too, with the
endpoint's own status and error body under `response`, exactly as an interactive call gets it.
"""

from __future__ import annotations

import codecs
import json
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from . import json_pieces
from .batch_store import LINE_FAILED, PENDING
from .errors import APIError

CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, RESPONSES_ENDPOINT = "/v1/chat/completions", "/v1/completions", "/v1/responses"
EMBEDDINGS_ENDPOINT, SCORE_ENDPOINT, RERANK_ENDPOINT = "/v1/embeddings", "/v1/score", "/v1/rerank"
MESSAGES_ENDPOINT = "/v1/messages"  # Anthropic's; its message batches are these (gateway/message_batches_api.py)
ENDPOINTS = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, RESPONSES_ENDPOINT, EMBEDDINGS_ENDPOINT, SCORE_ENDPOINT,
             RERANK_ENDPOINT, MESSAGES_ENDPOINT)
_CHUNK_BYTES = 1 << 20


class BatchInputError(Exception):
    """The input file as a whole is unusable: the batch fails with this as its error."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def as_error(self) -> dict:
        return {"code": self.code, "message": self.message, "param": "input_file_id", "line": None}


def checked_upload_chunks(src: BinaryIO, max_bytes: int, max_lines: int) -> Iterator[bytes]:
    """Yield `src`'s bytes, refusing (APIError) a file that is empty, too large, not UTF-8, or
    has more than `max_lines` lines. Per-line problems are left to the batch's error file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    num_bytes = num_newlines = 0
    last = b""
    while chunk := src.read(_CHUNK_BYTES):
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            raise APIError(413, f"the file exceeds the {max_bytes}-byte limit (max_upload_size)", param="file",
                           code="too_large")
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as e:
            raise APIError(400, f"the file is not UTF-8 text (byte {num_bytes - len(chunk) + e.start})",
                           param="file", code="invalid_file") from None
        num_newlines += chunk.count(b"\n")
        last = chunk[-1:]
        if num_newlines > max_lines:
            raise APIError(400, f"the file has more than {max_lines} lines (batch_max_lines)", param="file",
                           code="too_many_lines")
        yield chunk
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise APIError(400, "the file is not UTF-8 text (it ends inside a character)", param="file",
                       code="invalid_file") from None
    if num_bytes == 0:
        raise APIError(400, "the file is empty: send one JSON request per line", param="file", code="invalid_file")
    if num_newlines + (last != b"\n") > max_lines:
        raise APIError(400, f"the file has more than {max_lines} lines (batch_max_lines)", param="file",
                       code="too_many_lines")


def _request_id() -> str:
    return "batch_req_" + uuid.uuid4().hex


def output_line(custom_id: str | None, status_code: int, body: dict) -> str:
    """A line of the output file (status 200) or of the error file (the endpoint's error); the
    body, which may be 2,048 embeddings, in pieces (gateway/json_pieces.py)."""
    head = json.dumps({"id": _request_id(), "custom_id": custom_id, "error": None,
                       "response": {"status_code": status_code, "request_id": "req_" + uuid.uuid4().hex}})
    return f'{head[:-2]}, "body": {json_pieces.in_pieces(body)}}}}}'


def error_line(custom_id: str | None, code: str, message: str, line_no: int | None = None) -> str:
    """An error-file line for a request that was never sent to the endpoint."""
    return json.dumps({"id": _request_id(), "custom_id": custom_id, "response": None,
                       "error": {"code": code, "message": message, "line": line_no}})


def _problem(entry, line_no: int, endpoint: str, seen: dict[str, int]) -> tuple[str, str] | None:
    """(code, message) when this parsed line cannot be sent, else None."""
    if not isinstance(entry, dict):
        return "invalid_json", f"line {line_no} must be a JSON object"
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_custom_id", f"line {line_no} needs a non-empty string 'custom_id'"
    if custom_id in seen:
        return "duplicate_custom_id", f"custom_id {custom_id!r} is used on line {seen[custom_id]} already"
    if entry.get("method") != "POST":
        return "invalid_method", f"line {line_no}: 'method' must be \"POST\", got {entry.get('method')!r}"
    if entry.get("url") != endpoint:
        return "invalid_url", f"line {line_no}: 'url' is {entry.get('url')!r} but this batch's endpoint is {endpoint!r}"
    if not isinstance(entry.get("body"), dict):
        return "invalid_body", f"line {line_no}: 'body' must be a JSON object (the request body)"
    if entry["body"].get("stream") not in (None, False):
        return "streaming_unsupported", f"line {line_no}: 'stream' is not supported in a batch; remove it"
    return None


def read_input(src: BinaryIO, endpoint: str, max_lines: int) -> Iterator[tuple[int, str | None, str | None, str, str | None]]:
    """Yield (line_no, custom_id, body JSON, state, result) per non-blank line, as stored:
    state "pending" for a request to run, "failed" (with its error line) for one that cannot.
    Raises BatchInputError for a file with no requests or too many lines."""
    num_requests = 0
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(src, 1):
        if line_no == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # as some editors on Windows write JSONL
        if not raw.strip():
            continue
        num_requests += 1
        if num_requests > max_lines:
            raise BatchInputError("too_many_lines", f"the input file has more than {max_lines} requests")
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            yield line_no, None, None, LINE_FAILED, error_line(None, "invalid_json",
                                                               f"line {line_no} is not valid JSON: {e}", line_no)
            continue
        problem = _problem(entry, line_no, endpoint, seen)
        custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
        custom_id = custom_id if isinstance(custom_id, str) else None
        if problem is not None:
            yield line_no, custom_id, None, LINE_FAILED, error_line(custom_id, *problem, line_no)
            continue
        seen[custom_id] = line_no
        yield line_no, custom_id, json.dumps(entry["body"]), PENDING, None
    if num_requests == 0:
        raise BatchInputError("empty_file", "the input file holds no requests")
