"""Reading multipart image uploads under limits, for :mod:`deit.deploy.serve.app`.

The body is parsed as it streams in (python-multipart's push parser), so every limit applies
while reading, not after: a body that announces a ``Content-Length`` over the request limit is
refused before it is read; otherwise the request is refused with 413 as soon as the body passes
the request limit, one file passes ``max_file_bytes``, a text field passes 4 KiB or the files
outnumber ``max_files``. Every byte received is also counted against the server's upload
budget (a :class:`~deit.deploy.serve.limits.Reservation`), which answers 503 when the requests
in flight already hold too much. A client that hangs up mid-upload is logged in one line.
:func:`read_body` reads a whole non-multipart body (raw image bytes, JSON) under the same
rules, for the standard protocols' routes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deit.errors import ApiError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

    from deit.deploy.serve.limits import Reservation

FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and small fields
MAX_FIELD_BYTES = 4096  # a text field (top_k, token, format)
MAX_FIELDS = 16  # text fields per request
# uvicorn's logger, so the line lands with uvicorn's own, formatted and filtered alike
log = logging.getLogger("uvicorn.error")


class ClientGone(ApiError):
    """The client closed the connection before its upload was complete (nginx's 499)."""

    def __init__(self, message: str) -> None:
        super().__init__(499, message)


@dataclass
class Uploads:
    """The files (name, bytes) of one upload field and the form's text fields."""

    files: list[tuple[str, bytes]]
    fields: dict[str, str] = field(default_factory=dict)


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _FormReader:
    """python-multipart callbacks that keep the wanted files and the text fields, with limits.

    A part in ``field_name`` is a file whether or not it has a ``filename`` (curl's
    ``-F file=<x.png`` sends none); file parts in other fields are skipped unread.
    """

    def __init__(self, field_name: str, max_file_bytes: int, max_files: int) -> None:
        self.field_name, self.per_file, self.max_files = field_name, max_file_bytes, max_files
        self.uploads = Uploads(files=[])
        self.count = 0  # file parts seen in field_name (counted at their headers)
        self._headers: dict[bytes, bytes] = {}
        self._header_name = self._header_value = b""
        self._name: str | None = None
        self._filename: str | None = None
        self._kind = "skip"  # "file", "text" or "skip"
        self._data = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self._headers, self._data, self._kind = {}, bytearray(), "skip"
        self._header_name = self._header_value = b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise ApiError(400, "malformed multipart body: a part has no name")
        self._name = _decode_text(options[b"name"])
        filename = options.get(b"filename")
        self._filename = _decode_text(filename) if filename is not None else None
        if self._name == self.field_name:
            self._kind = "file"
            self.count += 1
            if self.count > self.max_files:
                raise ApiError(*too_many_files(self.field_name, self.max_files))
        elif filename is not None:
            self._kind = "skip"
        else:
            self._kind = "text"
            if len(self.uploads.fields) >= MAX_FIELDS:
                raise ApiError(413, f"more than {MAX_FIELDS} form fields")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._kind == "skip":
            return
        limit = self.per_file if self._kind == "file" else MAX_FIELD_BYTES
        if len(self._data) + end - start > limit:
            if self._kind == "file":
                raise ApiError(413, f"{self._filename or 'upload'}: file larger than {limit} bytes")
            raise ApiError(413, f"form field {self._name!r} larger than {limit} bytes")
        self._data += data[start:end]

    def part_end(self) -> None:
        data, self._data = bytes(self._data), bytearray()
        if self._kind == "file":
            self.uploads.files.append((self._filename or "upload", data))
        elif self._kind == "text" and self._name is not None:
            self.uploads.fields[self._name] = _decode_text(data)


def too_many_files(field_name: str, max_files: int) -> tuple[int, str]:
    """The status and message for more than ``max_files`` files, whatever the count."""
    if max_files > 1:
        return 413, f"at most {max_files} files per request in field {field_name!r}"
    return 422, f"send one file in field {field_name!r}"


async def read_uploads(
    request: Any,
    *,
    field_name: str,
    max_file_bytes: int,
    max_files: int = 1,
    budget: Reservation | None = None,
) -> Uploads:
    """Parse a ``multipart/form-data`` request's files under ``field_name``, as it streams in.

    Args:
        request: The Starlette/FastAPI request, body not yet read.
        field_name: The form field holding the file(s).
        max_file_bytes: Largest file.
        max_files: Most files; 1 means exactly one is expected.
        budget: Where the bytes received are counted (the server's upload budget); the caller
            releases them when it no longer holds the data.

    Raises:
        ApiError: 415 not multipart; 413 too large (body, a file, a field, or too many files);
            400 malformed body; 422 no file in ``field_name`` (or several where one is wanted);
            503 the upload budget is spent; :class:`ClientGone` the client hung up.
    """
    import python_multipart
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header
    from starlette.requests import ClientDisconnect

    limit = max_file_bytes * max_files + FORM_OVERHEAD
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(415, f"send the image as multipart/form-data in field {field_name!r}")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"upload of {length} bytes is larger than the limit of {limit}")
    boundary = parse_options_header(ctype)[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "malformed multipart body: no boundary in the content-type")
    reader = _FormReader(field_name, max_file_bytes, max_files)
    received = 0
    try:
        parser = python_multipart.MultipartParser(boundary, reader.callbacks())
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise ApiError(413, f"upload larger than {limit} bytes")
            if budget is not None:
                await budget.grow(len(chunk))
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect:
        client = request.client
        log.info(
            "%s: client %s disconnected after %d bytes of its upload",
            request.url.path,
            f"{client.host}:{client.port}" if client else "?",
            received,
        )
        raise ClientGone("client disconnected during the upload") from None
    except FormParserError as e:
        raise ApiError(400, f"malformed multipart body: {e}") from None
    uploads = reader.uploads
    if not uploads.files:
        raise ApiError(422, f"no file in form field {field_name!r}")
    return uploads


async def read_body(request: Any, *, limit: int, budget: Reservation | None = None) -> bytes:
    """The whole body of ``request``, refused (413) as soon as it passes ``limit`` bytes.

    A ``Content-Length`` over the limit is refused before anything is read; every chunk is
    counted against ``budget`` (503 when the server's upload budget is spent).

    Raises:
        ApiError: 413 too large, 400 empty, 503 budget spent; :class:`ClientGone` on hang-up.
    """
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"body of {length} bytes is larger than the limit of {limit}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise ApiError(413, f"body larger than {limit} bytes")
            if budget is not None:
                await budget.grow(len(chunk))
            body += chunk
    except ClientDisconnect:
        log.info("%s: client disconnected after %d bytes of its body", request.url.path, len(body))
        raise ClientGone("client disconnected during the upload") from None
    if not body:
        raise ApiError(400, "empty body: send an image")
    return bytes(body)


def parse_top_k(value: Any, default: int, num_classes: int) -> int:
    """``top_k`` from a query or form value: a positive integer (else 422), at most the classes."""
    if value is None or value == "":
        return min(default, num_classes)
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"top_k must be an integer, got {value!r}") from None
    if k < 1:
        raise ApiError(422, "top_k must be at least 1")
    return min(k, num_classes)
