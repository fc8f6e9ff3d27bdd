"""Reading multipart image uploads with size limits, for :mod:`deit.deploy.serve.app`.

The body is counted while it streams in, so an upload larger than the limit is refused with
413 after at most ``limit`` bytes, whether or not the client sent a ``Content-Length``; one
that announces a larger ``Content-Length`` is refused before its body is read.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from deit.errors import DeiTError

FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and small fields


class ApiError(DeiTError):
    """An error answered as ``{"error": message}`` with the HTTP status given."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


@dataclass
class Uploads:
    """The files (name, bytes) of one upload field and the form's text fields."""

    files: list[tuple[str, bytes]]
    fields: dict[str, str] = field(default_factory=dict)


def _limited_request(request: Any, limit: int) -> Any:
    """A copy of ``request`` whose body stream raises 413 once ``limit`` bytes are exceeded."""
    from starlette.requests import Request

    class LimitedRequest(Request):
        async def stream(self) -> AsyncGenerator[bytes, None]:
            total = 0
            async for chunk in super().stream():
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, f"upload larger than {limit} bytes")
                yield chunk

    return LimitedRequest(request.scope, request.receive)


async def read_uploads(
    request: Any, *, field_name: str, max_file_bytes: int, max_files: int = 1
) -> Uploads:
    """Parse a ``multipart/form-data`` request's files under ``field_name``.

    Args:
        request: The Starlette/FastAPI request, body not yet read.
        field_name: The form field holding the file(s).
        max_file_bytes: Largest file.
        max_files: Most files; 1 means exactly one is expected.

    Raises:
        ApiError: 415 not multipart; 413 too large (body, a file, or too many files);
            400 malformed body; 422 no file in ``field_name`` (or several where one is wanted).
    """
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    per_file, count, multiple = max_file_bytes, max_files, max_files > 1
    limit = per_file * count + FORM_OVERHEAD
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(415, f"send the image as multipart/form-data in field {field_name!r}")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"upload of {length} bytes is larger than the limit of {limit}")
    try:
        form = await _limited_request(request, limit).form(
            max_files=count + 1, max_fields=16, max_part_size=4096
        )
    except HTTPException as e:  # starlette's MultiPartException, as a 400
        raise ApiError(400, f"malformed multipart body: {e.detail}") from None
    try:
        uploads = Uploads(files=[])
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != field_name:
                    continue
                data = await value.read(per_file + 1)
                if len(data) > per_file:
                    raise ApiError(
                        413,
                        f"{value.filename or 'upload'}: file larger than {per_file} bytes",
                    )
                uploads.files.append((value.filename or "upload", data))
            else:
                uploads.fields[key] = value
    finally:
        await form.close()
    if not uploads.files:
        raise ApiError(422, f"no file in form field {field_name!r}")
    if len(uploads.files) > count:
        raise ApiError(
            413 if multiple else 422, f"at most {count} file(s) per request in field {field_name!r}"
        )
    return uploads


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
