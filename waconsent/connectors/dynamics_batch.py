"""The Dataverse `$batch` wire format (OData v4 multipart/mixed), built and read.

A request carries one change set per operation, each operation with its own
`Content-ID`, so one failing record cannot roll back its neighbours; with
`Prefer: odata.continue-on-error` the service goes on after a failure. Answers are
mapped back by `Content-ID`; a failed change set is answered by a bare
`application/http` part without one, so the part's position (the service answers
in request order) stands in for it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CRLF = "\r\n"
MAX_OPERATIONS = 1000

_BOUNDARY = re.compile(r'boundary="?([^";,\s]+)"?', re.IGNORECASE)


@dataclass(frozen=True)
class Operation:
    """One request inside the batch; `content_id` is unique within the batch."""

    content_id: str
    method: str
    url: str
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OperationResult:
    status: int
    headers: Mapping[str, str]
    body: str
    content_id: str | None = None

    def error(self) -> tuple[str, str]:
        """Dataverse's error `code` and `message`, when the body carries them."""
        return dataverse_error(self.body)


def dataverse_error(body: str) -> tuple[str, str]:
    """`error.code` and `error.message` of a Dataverse error body; empty strings when absent."""
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        return "", ""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return "", ""
    return str(error.get("code") or ""), str(error.get("message") or "")


def build(operations: Sequence[Operation], boundary: str | None = None) -> tuple[str, bytes]:
    """`(Content-Type header, body)` of a `$batch` POST: one change set per operation."""
    if len(operations) > MAX_OPERATIONS:
        raise ValueError(f"a $batch holds at most {MAX_OPERATIONS} operations")
    batch = boundary or f"batch_{uuid.uuid4()}"
    lines: list[str] = []
    for operation in operations:
        changeset = f"changeset_{uuid.uuid4()}"
        lines += [f"--{batch}", f"Content-Type: multipart/mixed; boundary={changeset}", ""]
        lines += [
            f"--{changeset}",
            "Content-Type: application/http",
            "Content-Transfer-Encoding: binary",
            f"Content-ID: {operation.content_id}",
            "",
        ]
        lines.append(f"{operation.method} {operation.url} HTTP/1.1")
        if operation.body is not None:
            lines.append("Content-Type: application/json; type=entry")
        lines += [f"{name}: {value}" for name, value in operation.headers.items()]
        lines.append("")
        lines.append(
            json.dumps(operation.body, separators=(",", ":")) if operation.body is not None else ""
        )
        lines.append(f"--{changeset}--")
    lines.append(f"--{batch}--")
    lines.append("")
    return f"multipart/mixed; boundary={batch}", CRLF.join(lines).encode("utf-8")


def boundary_of(content_type: str) -> str | None:
    match = _BOUNDARY.search(content_type)
    return match.group(1) if match else None


def split_parts(body: str, boundary: str) -> list[str]:
    """The raw parts between `--boundary` lines (preamble and epilogue dropped)."""
    parts: list[str] = []
    current: list[str] | None = None
    for line in body.replace("\r\n", "\n").split("\n"):
        if line.rstrip() == f"--{boundary}--":
            if current is not None:
                parts.append("\n".join(current))
            return parts
        if line.rstrip() == f"--{boundary}":
            if current is not None:
                parts.append("\n".join(current))
            current = []
        elif current is not None:
            current.append(line)
    if current is not None:
        parts.append("\n".join(current))
    return parts


def split_headers(raw: str) -> tuple[dict[str, str], str]:
    """A header block (names lower-cased) up to the first blank line, and what follows it."""
    lines = raw.split("\n")
    headers: dict[str, str] = {}
    for index, line in enumerate(lines):
        if not line.strip():
            return headers, "\n".join(lines[index + 1 :])
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, ""


def _http_response(raw: str, content_id: str | None) -> OperationResult | None:
    status_line, _, rest = raw.lstrip("\n").partition("\n")
    pieces = status_line.split(" ", 2)
    if len(pieces) < 2 or not pieces[0].startswith("HTTP/") or not pieces[1].isdigit():
        return None
    headers, body = split_headers(rest)
    return OperationResult(int(pieces[1]), headers, body.strip(), content_id)


def parse(content_type: str, body: str) -> list[list[OperationResult]]:
    """The answers of a batch response, grouped by top-level part (request order).

    A successful change set is a nested multipart with one answer per operation; a
    failed one (or a request outside any change set) is a single answer.
    """
    boundary = boundary_of(content_type)
    if boundary is None:
        raise ValueError("the $batch response is not multipart/mixed")
    groups: list[list[OperationResult]] = []
    for part in split_parts(body, boundary):
        headers, payload = split_headers(part)
        kind = headers.get("content-type", "")
        if kind.lower().startswith("multipart/mixed"):
            inner = boundary_of(kind)
            answers: list[OperationResult] = []
            for sub in split_parts(payload, inner or ""):
                sub_headers, sub_payload = split_headers(sub)
                answer = _http_response(sub_payload, sub_headers.get("content-id"))
                if answer is not None:
                    answers.append(answer)
            groups.append(answers)
        else:
            answer = _http_response(payload, headers.get("content-id"))
            groups.append([answer] if answer is not None else [])
    return groups


def match(
    operations: Sequence[Operation], groups: Sequence[Sequence[OperationResult]]
) -> dict[str, OperationResult]:
    """Content-ID -> answer; an answer without an id belongs to the change set at its position."""
    known = {operation.content_id for operation in operations}
    results: dict[str, OperationResult] = {}
    for position, answers in enumerate(groups):
        for answer in answers:
            if answer.content_id in known:
                results[answer.content_id] = answer
            elif position < len(operations) and len(answers) == 1:
                results.setdefault(operations[position].content_id, answer)
    return results
