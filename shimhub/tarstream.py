"""A tar reader for hostile archives: every header is bounded before anything is allocated for it.

Python's `tarfile` reads a PAX or GNU long-name header whole, whatever size it
declares, and on many deployed interpreters parses PAX records with a regular
expression that is quadratic in their length (CVE-2024-6232). This reader
reads ustar, GNU and PAX archives as layers and checkpoints use them, with
limits as Go's archive/tar has them: an extended header (PAX ``x``/``g``, GNU
``L``/``K``) of more than 1 MiB, a name or link target longer than PATH_MAX, or
a numeric field out of range is refused before it is read. PAX records are
split by their length prefixes, in one pass. Nothing here depends on the
interpreter's patch level.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from attrs import define, field

BLOCK = 512
#: Largest extended header (PAX or GNU long name) read, as Go's archive/tar allows.
MAX_HEADER_BYTES = 1 << 20
#: Longest name or link target (Linux's PATH_MAX).
PATH_MAX = 4096
#: Extended headers that may precede one entry.
MAX_HEADERS_PER_ENTRY = 8

REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO = "0", "1", "2", "3", "4", "5", "6"
_REGULAR_ALIASES = {"\0": REGULAR, "7": REGULAR}
_TYPES = frozenset((REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO))
_PAX_NUMBERS = ("size", "uid", "gid")
XATTR_PREFIX = "SCHILY.xattr."


class TarFormatError(ValueError):
    """The archive is not a tar this reader takes, or passes one of its limits."""


@define
class Entry:
    """One member of the archive; `read` gives its content (regular files only)."""

    name: str
    kind: str
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 0.0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(factory=dict)
    _reader: TarReader | None = field(default=None, repr=False)

    def read(self, size: int) -> bytes:
        """Up to `size` bytes of the content that are left ("" at its end)."""
        assert self._reader is not None
        return self._reader.read_content(size)


def _number(field_bytes: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU's base-256 form (its first byte's high bit set)."""
    if field_bytes and field_bytes[0] & 0x80:
        if field_bytes[0] == 0xFF:
            raise TarFormatError(f"negative {what} in a tar header")
        value = field_bytes[0] & 0x7F
        for byte in field_bytes[1:]:
            value = (value << 8) | byte
        return value
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"tar header field {what} is not a number: {text[:32]!r}") from None


def _text(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checked(block: bytes) -> None:
    stored = _number(block[148:156], "checksum")
    blanked = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(blanked)
    signed = sum(byte - 256 if byte > 127 else byte for byte in blanked)
    if stored not in (unsigned, signed):
        raise TarFormatError("tar header checksum does not match: not a tar archive, or a corrupt one")


def parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX records ("LENGTH KEY=VALUE\\n") split by their length prefixes, in one pass."""
    records: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        if data[position] == 0:
            break  # padding some writers leave
        space = data.find(b" ", position, position + 20)
        if space < 0 or not data[position:space].isdigit():
            raise TarFormatError("malformed PAX record: no length")
        length = int(data[position:space])
        end = position + length
        if length <= space - position + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise TarFormatError("malformed PAX record: its length does not fit")
        equals = data.find(b"=", space + 1, end)
        if equals < 0:
            raise TarFormatError("malformed PAX record: no '='")
        key = data[space + 1 : equals].decode("utf-8", "surrogateescape")
        records[key] = data[equals + 1 : end - 1]
        position = end
    return records


def _names(block: bytes, pax: dict[str, bytes], long_name: bytes | None, long_link: bytes | None) -> tuple[str, str]:
    """An entry's name and link target: PAX's over GNU's over the header's own."""
    name = _text(block[0:100])
    if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX ustar splits long names in a prefix
        name = f"{_text(block[345:500])}/{name}"
    if long_name is not None:
        name = long_name.decode("utf-8", "surrogateescape")
    linkname = long_link.decode("utf-8", "surrogateescape") if long_link is not None else _text(block[157:257])
    if any(key.startswith("GNU.sparse.") for key in pax):
        raise TarFormatError(f"tar entry {name[:256]!r} is a sparse file, which layers may not hold")
    if "path" in pax:
        name = pax["path"].decode("utf-8", "surrogateescape")
    if "linkpath" in pax:
        linkname = pax["linkpath"].decode("utf-8", "surrogateescape")
    if len(name.encode("utf-8", "surrogateescape")) > PATH_MAX or len(linkname) > PATH_MAX:
        raise TarFormatError(f"a tar entry's name or link target is longer than {PATH_MAX} bytes")
    return name, linkname


class TarReader:
    """Entries of an uncompressed tar stream, in order; each entry's content is read before the next."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self._left = 0  # content bytes of the current entry not read yet
        self._padding = 0
        self._global: dict[str, bytes] = {}

    def _exactly(self, count: int) -> bytes:
        chunks: list[bytes] = []
        wanted = count
        while wanted:
            chunk = self.stream.read(min(wanted, 1 << 20))
            if not chunk:
                raise TarFormatError("the tar archive ends in the middle of an entry")
            chunks.append(chunk)
            wanted -= len(chunk)
        return b"".join(chunks)

    def read_content(self, size: int) -> bytes:
        count = min(size, self._left)
        if count <= 0:
            return b""
        data = self.stream.read(count)
        if not data:
            raise TarFormatError("the tar archive ends in the middle of an entry")
        self._left -= len(data)
        return data

    def _skip_rest(self) -> None:
        while self._left:
            self.read_content(1 << 20)
        if self._padding:
            self._exactly(self._padding)
            self._padding = 0

    def _extension(self, size: int, kind: str) -> bytes:
        if size > MAX_HEADER_BYTES:
            raise TarFormatError(
                f"a tar extended header ({kind!r}) declares {size} bytes; at most {MAX_HEADER_BYTES} are read"
            )
        data = self._exactly(size)
        self._exactly(-size % BLOCK)
        return data

    def __iter__(self) -> Iterator[Entry]:
        while True:
            entry = self._next()
            if entry is None:
                return
            yield entry

    def _next(self) -> Entry | None:
        self._skip_rest()
        pax: dict[str, bytes] = {}
        long_name = long_link = None
        for _ in range(MAX_HEADERS_PER_ENTRY + 1):
            block = self.stream.read(BLOCK)
            if len(block) < BLOCK:
                block += self._exactly(BLOCK - len(block)) if block else b""
            if not block or block == bytes(BLOCK):
                return None  # end of archive
            _checked(block)
            kind = chr(block[156])
            size = _number(block[124:136], "size")
            if kind in ("x", "g"):
                records = parse_pax(self._extension(size, kind))
                (pax if kind == "x" else self._global).update(records)
                if sum(len(key) + len(value) for key, value in self._global.items()) > MAX_HEADER_BYTES:
                    raise TarFormatError(f"the tar's global headers hold more than {MAX_HEADER_BYTES} bytes")
                continue
            if kind in ("L", "K"):
                value = self._extension(size, kind).split(b"\0", 1)[0]
                if len(value) > PATH_MAX:
                    raise TarFormatError(f"a tar entry's name or link target is longer than {PATH_MAX} bytes")
                if kind == "L":
                    long_name = value
                else:
                    long_link = value
                continue
            return self._entry(block, kind, size, {**self._global, **pax}, long_name, long_link)
        raise TarFormatError(f"more than {MAX_HEADERS_PER_ENTRY} extended headers before one tar entry")

    def _entry(  # noqa: PLR0917 - the pieces of one header
        self,
        block: bytes,
        kind: str,
        size: int,
        pax: dict[str, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> Entry:
        name, linkname = _names(block, pax, long_name, long_link)
        numbers = {"size": size, "uid": _number(block[108:116], "uid"), "gid": _number(block[116:124], "gid")}
        for key in _PAX_NUMBERS:
            if key in pax:
                if not pax[key].isdigit() or len(pax[key]) > 20:
                    raise TarFormatError(f"tar entry {name[:256]!r}: PAX {key} {pax[key][:32]!r} is not a number")
                numbers[key] = int(pax[key])
        mtime: float = _number(block[136:148], "mtime")
        if "mtime" in pax:
            try:
                mtime = float(pax["mtime"][:32])
            except ValueError:
                raise TarFormatError(f"tar entry {name[:256]!r}: PAX mtime is not a number") from None
        kind = _REGULAR_ALIASES.get(kind, kind)
        if kind == REGULAR and name.endswith("/"):
            kind = DIRECTORY  # old archives mark directories by a trailing slash only
        if kind not in _TYPES:
            raise TarFormatError(f"tar entry {name[:256]!r} has an unsupported type {kind!r}")
        content = numbers["size"] if kind == REGULAR else 0
        self._left, self._padding = content, -content % BLOCK
        return Entry(
            name=name,
            kind=kind,
            size=content,
            mode=_number(block[100:108], "mode"),
            uid=numbers["uid"],
            gid=numbers["gid"],
            mtime=mtime,
            linkname=linkname,
            devmajor=_number(block[329:337], "devmajor") if kind in (CHARDEV, BLOCKDEV) else 0,
            devminor=_number(block[337:345], "devminor") if kind in (CHARDEV, BLOCKDEV) else 0,
            xattrs={key[len(XATTR_PREFIX) :]: value for key, value in pax.items() if key.startswith(XATTR_PREFIX)},
            reader=self,
        )
