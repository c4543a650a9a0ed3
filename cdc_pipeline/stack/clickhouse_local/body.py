"""Request bodies: framing (Content-Length / chunked), Content-Encoding, multipart forms, spooling."""

from __future__ import annotations

import email.policy
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from typing import IO, Protocol, cast

import lz4.frame
import zstandard

from cdc_pipeline.stack.clickhouse_local.errors import ClickHouseError

# Request bodies above this size are spooled to a temporary file instead of memory.
_SPOOL_MEMORY_BYTES = 64 << 20
_COPY_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_LINE = 65537


class _Decompressor(Protocol):
    eof: bool
    unused_data: bytes

    def decompress(self, data: bytes) -> bytes: ...


_DECOMPRESSORS: dict[str, Callable[[], _Decompressor]] = {
    "lz4": lambda: cast(_Decompressor, lz4.frame.LZ4FrameDecompressor()),
    "zstd": lambda: cast(_Decompressor, zstandard.ZstdDecompressor().decompressobj()),
    "gzip": lambda: cast(_Decompressor, zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)),
    "x-gzip": lambda: cast(_Decompressor, zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)),
    "deflate": lambda: cast(_Decompressor, zlib.decompressobj()),
}


def decompress(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """Decode a Content-Encoding stream made of one or more concatenated frames.

    clickhouse-connect compresses every insert block as its own lz4/zstd frame.
    """
    factory = _DECOMPRESSORS.get(encoding)
    if factory is None:
        raise ClickHouseError(89, "UNKNOWN_COMPRESSION_METHOD", f"Unknown HTTP Content-Encoding: {encoding!r}")
    decoder = factory()
    pending = False
    try:
        for chunk in chunks:
            while chunk:
                pending = True
                output = decoder.decompress(chunk)
                if output:
                    yield output
                if not decoder.eof:
                    break
                chunk = decoder.unused_data
                decoder = factory()
                pending = False
    except (RuntimeError, zlib.error, zstandard.ZstdError) as exc:
        raise ClickHouseError(271, "CANNOT_DECOMPRESS", f"Cannot decompress request body: {exc}") from exc
    if pending:
        raise ClickHouseError(271, "CANNOT_DECOMPRESS", "Unexpected end of compressed request body")


def content_length_body(rfile: IO[bytes], length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        data = rfile.read(min(remaining, _COPY_CHUNK_BYTES))
        if not data:
            raise ClickHouseError(33, "CANNOT_READ_ALL_DATA", "Request body ended early")
        remaining -= len(data)
        yield data


def chunked_body(rfile: IO[bytes]) -> Iterator[bytes]:
    while True:
        line = rfile.readline(_MAX_CHUNK_LINE)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise ClickHouseError(33, "CANNOT_READ_ALL_DATA", "Malformed chunked body") from exc
        if size == 0:
            # Drain optional trailer fields up to the terminating blank line.
            while rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):
                pass
            return
        yield from content_length_body(rfile, size)
        rfile.readline(_MAX_CHUNK_LINE)


def parse_form(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a ``multipart/form-data`` body (query text and ``param_*`` bindings)."""
    raw = f"Content-Type: {content_type}\r\n\r\n".encode() + body
    message = cast(EmailMessage, BytesParser(policy=email.policy.HTTP).parsebytes(raw))
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None:
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "External data tables are not supported by this endpoint")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = payload.decode() if isinstance(payload, bytes) else ""
    return fields


class SpooledBody:
    """A decoded request body, spooled to memory or a temporary file."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY_BYTES)  # noqa: SIM115
        self.size = 0
        try:
            for chunk in chunks:
                self._file.write(chunk)
                self.size += len(chunk)
        except BaseException:
            self._file.close()
            raise
        self._file.seek(0)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def chunks(self) -> Iterator[bytes]:
        return iter(lambda: self._file.read(_COPY_CHUNK_BYTES), b"")

    def close(self) -> None:
        self._file.close()
