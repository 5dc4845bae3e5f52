"""Turn an adapter upload into a directory of plain files, trusting neither the client nor
the archive it sends.

The HTTP layer passes each multipart part as (filename, async chunks), so a multi-GB weight
file is streamed to disk and refused as soon as it crosses a limit, never held in memory.
A single .tar / .tar.gz / .tgz / .zip upload is unpacked instead of kept.

Cleanup contract: on any error (UploadError, cancellation, disk errors) both functions delete
every file they created in `dest_dir` and nothing else. They only ever create flat, validated
file names directly inside `dest_dir` (no subdirectories, no links), opened with O_EXCL so a
pre-existing entry is never followed or overwritten. The caller still owns `dest_dir` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import os
import stat
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass

GiB = 1 << 30
_CHUNK_BYTES = 1 << 20
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
# Errors tarfile/zipfile/gzip raise for malformed input; anything else (disk full, ...) is ours.
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile,
                NotImplementedError)  # zipfile: unsupported compression method


class UploadError(Exception):
    """An upload refused before it reaches adapter validation. `status` is the HTTP status
    (400 bad request, 413 over a limit, 422 unusable archive); `code` is what clients branch on."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"UploadError({self.status}, {self.code!r}, {self.message!r})"


@dataclass
class UploadLimits:
    max_total_bytes: int = 2 * GiB   # all uploaded bytes, and separately all uncompressed archive bytes
    max_files: int = 64              # uploaded files, or regular files inside the archive
    max_member_bytes: int = 2 * GiB  # any one file (an uploaded archive itself is bound by the total)

    def __post_init__(self):
        for name in ("max_total_bytes", "max_files", "max_member_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"UploadLimits.{name} must be a positive integer, got {value!r}")


def _fmt(num_bytes: int) -> str:
    power = min(4, max(0, (num_bytes.bit_length() - 1) // 10))
    return f"{num_bytes} bytes" if power == 0 else f"{num_bytes / 1024 ** power:.1f} {'KMGT'[power - 1]}iB"


def _too_large(what: str, limit_name: str, limit: int) -> UploadError:
    return UploadError(413, "too_large", f"{what} exceeds the {_fmt(limit)} limit ({limit_name})")


def _name_problem(name: object) -> str | None:
    """Why `name` cannot be a file name directly inside dest_dir, or None if it can."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        return "is empty or a relative directory reference"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(unicodedata.category(c) == "Cc" for c in name):  # NUL, newlines, escapes: break logs and paths
        return "contains control characters"
    try:
        return "is longer than 255 bytes" if len(name.encode("utf-8")) > 255 else None
    except UnicodeEncodeError:  # lone surrogates smuggled in through surrogateescape
        return "is not valid UTF-8"


def _sniff(head: bytes) -> str | None:
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _create(dest_dir: str, name: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(os.path.join(dest_dir, name), flags, 0o600)


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def save_upload_files(files, dest_dir, limits: UploadLimits | None = None) -> list[str]:
    """Stream `files` ([(filename, async iterable of bytes chunks)]) into `dest_dir` and return
    the sorted names of the files now there. One archive upload is extracted (flattened)."""
    limits = limits or UploadLimits()
    dest, files = os.fspath(dest_dir), list(files)
    if not files:
        raise UploadError(400, "empty_upload", "no files were uploaded: send adapter_config.json and "
                          "adapter_model.safetensors, or one .tar.gz/.zip archive holding them")
    if len(files) > limits.max_files:
        raise UploadError(413, "too_many_files", f"{len(files)} files uploaded; at most {limits.max_files} are allowed")
    seen: set[str] = set()
    for name, _ in files:  # refuse bad names before reading a single byte
        problem = _name_problem(name)
        if problem:
            raise UploadError(400, "unsafe_filename", f"file name {name!r} {problem}; send plain file names only")
        if name in seen:
            raise UploadError(400, "duplicate_file", f"file {name!r} was uploaded twice")
        seen.add(name)

    is_single = len(files) == 1
    created: list[str] = []
    archive_path, num_total_bytes = None, 0
    try:
        for name, chunks in files:
            # A temp name first, so a refused or half-streamed file never sits under its real name.
            fd, tmp_path = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=dest)
            created.append(tmp_path)
            head, num_bytes = b"", 0
            named_archive = is_single and name.lower().endswith(_ARCHIVE_SUFFIXES)
            iterator = aiter(chunks)
            try:
                with os.fdopen(fd, "wb") as out:
                    async for chunk in iterator:
                        # Checked before writing: an oversized chunk never touches the disk.
                        if num_total_bytes + len(chunk) > limits.max_total_bytes:
                            raise _too_large("the upload", "max_total_bytes", limits.max_total_bytes)
                        if len(head) < 512:
                            head += bytes(chunk[:512 - len(head)])
                        # An archive's own size is bound by the total; its members are checked on extraction.
                        is_archive = named_archive or (is_single and _sniff(head) is not None)
                        if num_bytes + len(chunk) > limits.max_member_bytes and not is_archive:
                            raise _too_large(f"file {name!r}", "max_member_bytes", limits.max_member_bytes)
                        out.write(chunk)
                        num_bytes += len(chunk)
                        num_total_bytes += len(chunk)
            finally:
                # Stop the producer now (e.g. release the request body) rather than at GC time.
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            if named_archive or (is_single and _sniff(head) is not None):
                archive_path = tmp_path  # extracted below; the archive itself never gets a real name
                break
            final_path = os.path.join(dest, name)
            if os.path.lexists(final_path):  # dest_dir was not fresh: never clobber what we did not write
                raise FileExistsError(final_path)
            os.rename(tmp_path, final_path)
            created[-1] = final_path
        if num_total_bytes == 0:
            raise UploadError(400, "empty_upload", "every uploaded file is empty")
        if archive_path is not None:
            future = asyncio.get_running_loop().run_in_executor(
                None, functools.partial(extract_archive, archive_path, dest, limits, display_name=files[0][0]))
            try:
                names = await asyncio.shield(future)
            except asyncio.CancelledError:
                # The thread cannot be interrupted: wait for it so the cleanup below sees its files.
                with contextlib.suppress(UploadError, OSError):  # when it fails, it removes its own files
                    created.extend(os.path.join(dest, n) for n in await future)
                raise
            _unlink_all([archive_path])
            return names
        return sorted(os.path.basename(p) for p in created)
    except BaseException:
        _unlink_all(created)
        raise


def _member_parts(raw: str) -> list[str]:
    """Path components of an archive member name, refusing anything that could leave dest_dir."""
    if raw.startswith("/") or (len(raw) > 1 and raw[0].isalpha() and raw[1] == ":"):  # "/x", "C:x"
        raise UploadError(422, "unsafe_archive", f"archive member {raw!r} has an absolute path")
    if "\\" in raw:  # a Windows separator: "..\\x" would escape on the wrong platform
        raise UploadError(422, "unsafe_archive", f"archive member {raw!r} contains a backslash")
    parts = [p for p in raw.split("/") if p not in ("", ".")]  # "./a" and "a//b" are benign
    if ".." in parts:
        raise UploadError(422, "unsafe_archive", f"archive member {raw!r} contains '..'")
    for part in parts:
        problem = _name_problem(part)
        if problem:
            raise UploadError(422, "unsafe_archive", f"archive member {raw!r}: a path component {problem}")
    return parts


_TAR_KINDS = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device",
              tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a FIFO"}
_MODE_KINDS = {stat.S_IFLNK: "a symlink", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device",
               stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def _tar_entries(tf: tarfile.TarFile):
    for m in tf:  # lazily: headers are parsed one by one, so _plan's limits stop a hostile stream early
        kind = ("dir" if m.isdir() else "file" if m.isreg() and not m.issparse()
                else _TAR_KINDS.get(m.type, "not a regular file"))
        yield m.name, kind, m.size, functools.partial(tf.extractfile, m)


def _zip_entries(zf: zipfile.ZipFile):
    for info in zf.infolist():
        file_type = stat.S_IFMT(info.external_attr >> 16)  # Unix st_mode if made on Unix, else 0
        kind = ("dir" if info.is_dir() or file_type == stat.S_IFDIR else "encrypted" if info.flag_bits & 0x1
                else "file" if file_type in (0, stat.S_IFREG) else _MODE_KINDS.get(file_type, "not a regular file"))
        yield info.filename, kind, info.file_size, functools.partial(zf.open, info)


def _plan(entries, limits: UploadLimits, label: str) -> list[tuple[str, str, object]]:
    """Check every member before anything is written; return (final name, member name, opener)."""
    files, num_entries, declared_bytes = [], 0, 0
    for raw, kind, size, opener in entries:
        num_entries += 1
        if num_entries > 4 * limits.max_files + 16:  # bounds header parsing of archives full of dirs/junk
            raise UploadError(413, "too_many_files", f"{label!r} has more than {num_entries - 1} entries")
        parts = _member_parts(raw)
        if kind == "dir" or not parts:
            continue
        if kind != "file":
            raise UploadError(422, "unsafe_archive",
                              f"archive member {raw!r} is {kind}; only regular files and directories are allowed")
        if parts[0] == "__MACOSX" or parts[-1] in _JUNK_NAMES or parts[-1].startswith("._"):
            continue  # desktop archivers' metadata, never adapter files
        if len(files) == limits.max_files:
            raise UploadError(413, "too_many_files", f"{label!r} holds more than {limits.max_files} files")
        if size > limits.max_member_bytes:
            raise _too_large(f"archive member {raw!r} ({_fmt(size)} uncompressed)", "max_member_bytes",
                             limits.max_member_bytes)
        declared_bytes += size
        if declared_bytes > limits.max_total_bytes:
            raise _too_large(f"the uncompressed contents of {label!r}", "max_total_bytes", limits.max_total_bytes)
        files.append((parts, raw, opener))
    if not files:
        raise UploadError(400, "empty_upload", f"{label!r} contains no files")
    depths, tops = {len(p) for p, _, _ in files}, {p[0] for p, _, _ in files}
    if not (depths == {1} or (depths == {2} and len(tops) == 1)):
        raw = max(files, key=lambda f: len(f[0]))[1]
        raise UploadError(422, "nested_directory", f"archive member {raw!r} is in a subdirectory; put the adapter "
                          "files at the top of the archive or inside a single top-level folder")
    plan, finals = [], set()
    for parts, raw, opener in files:
        if parts[-1] in finals:
            raise UploadError(422, "unsafe_archive", f"archive member {raw!r} duplicates another member's name")
        finals.add(parts[-1])
        plan.append((parts[-1], raw, opener))
    return plan


def _copy(src, out, raw: str, limits: UploadLimits, used_bytes: int) -> int:
    num_bytes = 0
    while chunk := src.read(_CHUNK_BYTES):
        num_bytes += len(chunk)
        # Declared sizes were checked in _plan, but they come from the archive and can lie.
        if num_bytes > limits.max_member_bytes:
            raise _too_large(f"archive member {raw!r}", "max_member_bytes", limits.max_member_bytes)
        if used_bytes + num_bytes > limits.max_total_bytes:
            raise _too_large("the archive's uncompressed contents", "max_total_bytes", limits.max_total_bytes)
        out.write(chunk)
    return used_bytes + num_bytes


def _open_archive(path, label: str):
    with open(path, "rb") as f:
        kind = _sniff(f.read(512))  # the content decides, not the (client-chosen) name
    try:
        if kind == "zip":
            return zipfile.ZipFile(path), kind
        if kind is not None:
            return tarfile.open(path, "r:gz" if kind == "gz" else "r:"), kind
    except _READ_ERRORS as e:
        raise UploadError(422, "not_an_archive", f"{label!r} is not a tar, tar.gz or zip archive: {e}") from e
    raise UploadError(422, "not_an_archive", f"{label!r} is not a tar, tar.gz or zip archive")


def extract_archive(archive_path, dest_dir, limits: UploadLimits | None = None, *,
                    display_name: str | None = None) -> list[str]:
    """Extract a tar / tar.gz / zip (detected by magic bytes, not name) flat into `dest_dir` and
    return the sorted file names written. Blocking: async callers run it in a thread."""
    limits = limits or UploadLimits()
    dest = os.fspath(dest_dir)
    label = display_name or os.path.basename(os.fspath(archive_path))
    archive, kind = _open_archive(archive_path, label)
    created: list[str] = []
    with archive:
        try:
            entries = _zip_entries(archive) if kind == "zip" else _tar_entries(archive)
            used_bytes = 0
            for final, raw, opener in _plan(entries, limits, label):
                fd = _create(dest, final)
                created.append(os.path.join(dest, final))
                with os.fdopen(fd, "wb") as out, opener() as src:
                    used_bytes = _copy(src, out, raw, limits, used_bytes)
        except _READ_ERRORS as e:
            _unlink_all(created)
            raise UploadError(422, "corrupt_archive", f"{label!r} could not be read: {e}") from e
        except BaseException:
            _unlink_all(created)
            raise
    return sorted(os.path.basename(p) for p in created)


async def read_upload_form(request, what: str, max_upload_size: int, *, max_files: int, max_fields: int,
                           expected: str = "", param: str | None = None):
    """The multipart form of an upload request, after checking its declared size. Without a
    Content-Length the multipart parser would spool a body of any size to disk before our
    limits could look at it, so one is required (411)."""
    from .errors import APIError

    length = request.headers.get("content-length")
    if not (length and length.isdigit()):
        raise APIError(411, f"{what} need a Content-Length header", code="length_required")
    if int(length) > max_upload_size:
        raise APIError(413, f"upload of {length} bytes exceeds the limit of {max_upload_size} (max_upload_size)",
                       param=param, code="too_large")
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except Exception as e:  # noqa: BLE001 - malformed multipart bodies
        raise APIError(400, f"expected a multipart/form-data body{expected}: {e}", param="body") from None
