"""Adapter uploads: streamed plain files and hostile archives (loragate.gateway.uploads)."""

from __future__ import annotations

import asyncio
import io
import stat
import struct
import tarfile
import zipfile

import pytest
from loragate.gateway.uploads import (
    UploadError,
    UploadLimits,
    extract_archive,
    save_upload_files,
)

CONFIG = b'{"peft_type": "LORA", "r": 8}'
WEIGHTS = bytes(range(256)) * 40


class Chunks:
    """An async chunk source that records how far it was read and whether it was closed."""

    def __init__(self, data: bytes, chunk_size: int = 1000):
        self.chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
        self.num_yielded = 0
        self.closed = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        try:
            for chunk in self.chunks:
                self.num_yielded += 1
                yield chunk
        finally:
            self.closed = True


def save(files, dest, **limits):
    return asyncio.run(save_upload_files(files, dest, UploadLimits(**limits)))


@pytest.fixture
def dest(tmp_path):
    d = tmp_path / "dest"
    d.mkdir()
    return d


def assert_refused(exc_info, status, code, fragment):
    err = exc_info.value
    assert (err.status, err.code) == (status, code), repr(err)
    assert fragment in err.message, err.message


def assert_clean(tmp_path, dest):
    """Nothing left in dest and nothing created next to it (traversal targets live in tmp_path)."""
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def tar_bytes(members, mode="w:gz") -> bytes:
    """members: (TarInfo or name, data or None); a name ending in "/" is a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for info, data in members:
            if isinstance(info, str):
                info = special(info, tarfile.DIRTYPE) if info.endswith("/") else tarfile.TarInfo(info)
                data = None if info.isdir() else data
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def special(name, type_, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    return info


def zip_bytes(members, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """members: (name or ZipInfo, data)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def upload_archive(name, data, dest, **limits):
    return save([(name, Chunks(data, 4096))], dest, **limits)


# --- plain files ------------------------------------------------------------------------

def test_plain_files_are_streamed_to_their_names(tmp_path, dest):
    sources = [Chunks(CONFIG, 7), Chunks(WEIGHTS, 1000)]
    names = save([("adapter_config.json", sources[0]), ("adapter_model.safetensors", sources[1])], dest)
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    assert (dest / "adapter_config.json").read_bytes() == CONFIG
    assert (dest / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert sorted(p.name for p in dest.iterdir()) == names  # no temp files left behind
    assert stat.S_IMODE((dest / "adapter_model.safetensors").stat().st_mode) == 0o600
    assert all(s.num_yielded == len(s.chunks) and s.closed for s in sources)


def test_total_limit_stops_reading_mid_stream(tmp_path, dest):
    first, second = Chunks(CONFIG), Chunks(b"x" * 100_000, 1000)

    async def upload():
        with pytest.raises(UploadError) as exc_info:
            await save_upload_files([("adapter_config.json", first), ("adapter_model.safetensors", second)], dest,
                                    UploadLimits(max_total_bytes=10_000))
        return exc_info, second.closed  # read before asyncio.run's shutdown closes leftover generators

    exc_info, was_closed = asyncio.run(upload())
    assert_refused(exc_info, 413, "too_large", "max_total_bytes")
    assert second.num_yielded <= 11 < len(second.chunks)  # refused at the chunk that crossed the limit
    assert was_closed  # the producer was told to stop, not left for garbage collection
    assert_clean(tmp_path, dest)  # including the already complete adapter_config.json


def test_cancelled_upload_leaves_nothing(tmp_path, dest):
    # A client that disconnects mid-body cancels the handler: files already written go too.
    async def main():
        started = asyncio.Event()

        async def stalled():
            yield b"x" * 1000
            started.set()
            await asyncio.Event().wait()  # the body never finishes

        task = asyncio.create_task(save_upload_files([("adapter_config.json", Chunks(CONFIG)),
                                                      ("adapter_model.safetensors", stalled())], dest))
        await started.wait()
        assert len(list(dest.iterdir())) == 2  # one complete file, one partial temp file
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert_clean(tmp_path, dest)


def test_member_limit_names_the_file(tmp_path, dest):
    source = Chunks(b"x" * 50_000, 1000)
    with pytest.raises(UploadError) as exc_info:
        save([("adapter_config.json", Chunks(CONFIG)), ("adapter_model.safetensors", source)], dest,
             max_member_bytes=5_000)
    assert_refused(exc_info, 413, "too_large", "'adapter_model.safetensors'")
    assert source.num_yielded == 6
    assert_clean(tmp_path, dest)


def test_too_many_files_is_refused_before_reading(tmp_path, dest):
    sources = [Chunks(b"x") for _ in range(3)]
    with pytest.raises(UploadError) as exc_info:
        save([(f"f{i}", s) for i, s in enumerate(sources)], dest, max_files=2)
    assert_refused(exc_info, 413, "too_many_files", "at most 2")
    assert all(s.num_yielded == 0 for s in sources)
    assert_clean(tmp_path, dest)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../evil", "/etc/passwd", "..\\evil", "a\x00b",
                                  "a\nb", "a\x1b[31m", "x" * 256, "bad\udcff"])
def test_bad_filenames_are_refused_before_reading(tmp_path, dest, name):
    source = Chunks(b"data")
    with pytest.raises(UploadError) as exc_info:
        save([(name, source)], dest)
    assert_refused(exc_info, 400, "unsafe_filename", "send plain file names only")
    assert source.num_yielded == 0
    assert_clean(tmp_path, dest)


def test_duplicate_filenames_are_refused(tmp_path, dest):
    with pytest.raises(UploadError) as exc_info:
        save([("a.json", Chunks(b"1")), ("a.json", Chunks(b"2"))], dest)
    assert_refused(exc_info, 400, "duplicate_file", "'a.json'")
    assert_clean(tmp_path, dest)


@pytest.mark.parametrize("files", [[], [("adapter_config.json", b"")], [("a", b""), ("b", b"")],
                                   [("empty.tar.gz", b"")]])
def test_empty_upload(tmp_path, dest, files):
    with pytest.raises(UploadError) as exc_info:
        save([(n, Chunks(d)) for n, d in files], dest)
    assert_refused(exc_info, 400, "empty_upload", "empty" if files else "no files")
    assert_clean(tmp_path, dest)


def test_existing_entry_in_dest_is_never_followed(tmp_path, dest):
    outside = tmp_path / "outside.json"
    outside.write_bytes(b"keep")
    (dest / "adapter_config.json").symlink_to(outside)
    with pytest.raises(FileExistsError):
        upload_archive("a.zip", zip_bytes([("adapter_config.json", CONFIG)]), dest)
    with pytest.raises(FileExistsError):
        save([("adapter_config.json", Chunks(CONFIG))], dest)
    assert outside.read_bytes() == b"keep"
    assert [p.name for p in dest.iterdir()] == ["adapter_config.json"]  # only the pre-existing link


# --- archives that are fine -------------------------------------------------------------

@pytest.mark.parametrize("name, data", [
    ("my-adapter.tar.gz", tar_bytes([("my-adapter/", None), ("my-adapter/adapter_config.json", CONFIG),
                                     ("my-adapter/adapter_model.safetensors", WEIGHTS)])),
    ("my-adapter.tar", tar_bytes([("./my-adapter/adapter_config.json", CONFIG),
                                  ("./my-adapter/adapter_model.safetensors", WEIGHTS)], mode="w")),
    ("flat.tgz", tar_bytes([("adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)])),
    ("my-adapter.zip", zip_bytes([("my-adapter/", b""), ("my-adapter/adapter_config.json", CONFIG),
                                  ("my-adapter/adapter_model.safetensors", WEIGHTS),
                                  ("my-adapter/.DS_Store", b"junk"), ("__MACOSX/my-adapter/._x", b"junk")])),
    ("upload.bin", zip_bytes([("adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)])),
], ids=lambda v: v if isinstance(v, str) else "archive")  # its bytes hold timestamps: every xdist worker must collect the same ids
def test_archives_are_extracted_flat(tmp_path, dest, name, data):
    names = upload_archive(name, data, dest)
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in dest.iterdir()) == names  # the archive itself is gone
    assert (dest / "adapter_config.json").read_bytes() == CONFIG
    assert (dest / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_archive_member_among_several_files_is_kept_as_is(dest):
    data = zip_bytes([("adapter_config.json", CONFIG)])
    names = save([("a.zip", Chunks(data)), ("adapter_config.json", Chunks(CONFIG))], dest)
    assert names == ["a.zip", "adapter_config.json"]
    assert (dest / "a.zip").read_bytes() == data


def test_cancelled_during_extraction_leaves_nothing(tmp_path, dest, monkeypatch):
    # Extraction runs in a thread that cancellation cannot stop; its files must still go.
    import threading

    from loragate.gateway import uploads
    extracted, gate = threading.Event(), threading.Event()
    real_extract = uploads.extract_archive

    def slow_extract(*args, **kwargs):
        names = real_extract(*args, **kwargs)
        extracted.set()
        gate.wait(10)
        return names

    monkeypatch.setattr(uploads, "extract_archive", slow_extract)
    data = tar_bytes([("top/adapter_config.json", CONFIG), ("top/adapter_model.safetensors", WEIGHTS)])

    async def main():
        task = asyncio.create_task(save_upload_files([("a.tgz", Chunks(data))], dest))
        await asyncio.get_running_loop().run_in_executor(None, extracted.wait, 10)
        assert len(list(dest.iterdir())) == 3  # both members and the archive
        task.cancel()
        await asyncio.sleep(0)  # let the cancellation reach the task before the thread returns
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert_clean(tmp_path, dest)


def test_extract_archive_directly(tmp_path, dest):
    path = tmp_path / "a.tgz"
    path.write_bytes(tar_bytes([("top/adapter_config.json", CONFIG)]))
    assert extract_archive(path, dest, UploadLimits()) == ["adapter_config.json"]
    path.unlink()


# --- hostile archives -------------------------------------------------------------------

def _tar_attacks(tmp_path):
    target = str(tmp_path / "pwned")
    return {
        "absolute": ([(target, b"x")], "has an absolute path"),
        "traversal": ([("ok.json", CONFIG), ("top/../../pwned", b"x")], "contains '..'"),
        "backslash": ([("..\\pwned", b"x")], "backslash"),
        "symlink": ([(special("adapter_config.json", tarfile.SYMTYPE, "/etc/passwd"), None)], "is a symlink"),
        "hardlink": ([(special("adapter_config.json", tarfile.LNKTYPE, "/etc/passwd"), None)], "is a hard link"),
        "chardev": ([(special("adapter_config.json", tarfile.CHRTYPE), None)], "is a device"),
        "blockdev": ([(special("adapter_config.json", tarfile.BLKTYPE), None)], "is a device"),
        "fifo": ([(special("adapter_config.json", tarfile.FIFOTYPE), None)], "is a FIFO"),
        "control": ([("a\x1bb", b"x")], "control characters"),
    }


@pytest.mark.parametrize("attack", ["absolute", "traversal", "backslash", "symlink", "hardlink", "chardev",
                                    "blockdev", "fifo", "control"])
@pytest.mark.parametrize("mode, name", [("w:gz", "evil.tar.gz"), ("w", "evil.tar")])
def test_tar_attacks_are_refused(tmp_path, dest, attack, mode, name):
    members, fragment = _tar_attacks(tmp_path)[attack]
    # a benign member first: refusal must come before anything is written
    data = tar_bytes([("ok2.json", CONFIG)] + members, mode=mode)
    with pytest.raises(UploadError) as exc_info:
        upload_archive(name, data, dest)
    assert_refused(exc_info, 422, "unsafe_archive", fragment)
    member = members[-1][0]
    assert repr(member if isinstance(member, str) else member.name) in exc_info.value.message
    assert_clean(tmp_path, dest)


def _zip_symlink():
    info = zipfile.ZipInfo("adapter_config.json")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _zip_fifo():
    info = zipfile.ZipInfo("adapter_config.json")
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return info


@pytest.mark.parametrize("member, fragment", [
    ("/abs/pwned", "absolute path"), ("C:/pwned", "absolute path"), ("top/../../pwned", "contains '..'"),
    ("..\\pwned", "backslash"), (_zip_symlink(), "is a symlink"), (_zip_fifo(), "is a FIFO")])
def test_zip_attacks_are_refused(tmp_path, dest, member, fragment):
    with pytest.raises(UploadError) as exc_info:
        upload_archive("evil.zip", zip_bytes([("ok.json", CONFIG), (member, b"/etc/passwd")]), dest)
    assert_refused(exc_info, 422, "unsafe_archive", fragment)
    assert_clean(tmp_path, dest)


def test_nested_directories_are_refused(tmp_path, dest):
    for members in ([("a/adapter_config.json", CONFIG), ("a/b/adapter_model.safetensors", WEIGHTS)],
                    [("adapter_config.json", CONFIG), ("a/adapter_model.safetensors", WEIGHTS)],
                    [("a/adapter_config.json", CONFIG), ("b/adapter_model.safetensors", WEIGHTS)]):
        with pytest.raises(UploadError) as exc_info:
            upload_archive("a.tgz", tar_bytes(members), dest)
        assert_refused(exc_info, 422, "nested_directory", "single top-level folder")
        assert_clean(tmp_path, dest)


def test_duplicate_members_after_flattening_are_refused(tmp_path, dest):
    with pytest.raises(UploadError) as exc_info:
        upload_archive("a.tgz", tar_bytes([("top/x", b"1"), ("top/x", b"2")]), dest)
    assert_refused(exc_info, 422, "unsafe_archive", "duplicates")
    assert_clean(tmp_path, dest)


def test_too_many_members(tmp_path, dest):
    for data in (tar_bytes([(f"f{i}", b"x") for i in range(5)]), zip_bytes([(f"f{i}", b"x") for i in range(5)])):
        with pytest.raises(UploadError) as exc_info:
            upload_archive("many.bin", data, dest, max_files=4)
        assert_refused(exc_info, 413, "too_many_files", "more than 4 files")
        assert_clean(tmp_path, dest)


def test_too_many_entries_even_if_only_directories(tmp_path, dest):
    with pytest.raises(UploadError) as exc_info:
        upload_archive("dirs.tgz", tar_bytes([(f"top/d{i}/", b"") for i in range(100)] + [("top/x", b"x")]),
                       dest, max_files=4)
    assert_refused(exc_info, 413, "too_many_files", "entries")
    assert_clean(tmp_path, dest)


@pytest.mark.parametrize("make", [zip_bytes, tar_bytes])
def test_bomb_by_total_uncompressed_size(tmp_path, dest, make):
    zeros = bytes(4 << 20)
    data = make([("a", zeros), ("b", zeros), ("c", zeros)])
    assert len(data) < 100_000  # 12 MiB that compresses to almost nothing
    with pytest.raises(UploadError) as exc_info:
        upload_archive("bomb.bin", data, dest, max_total_bytes=5 << 20)
    assert_refused(exc_info, 413, "too_large", "uncompressed contents of 'bomb.bin'")
    assert_clean(tmp_path, dest)


def test_member_over_per_member_limit(tmp_path, dest):
    with pytest.raises(UploadError) as exc_info:
        upload_archive("a.zip", zip_bytes([("ok", b"x"), ("big", bytes(1 << 20))]), dest, max_member_bytes=1000)
    assert_refused(exc_info, 413, "too_large", "archive member 'big' (1.0 MiB uncompressed)")
    assert_clean(tmp_path, dest)


def _understate_zip_sizes(data: bytes, fake_size: int) -> bytes:
    """Rewrite every central-directory entry's uncompressed size (what zipfile trusts)."""
    data = bytearray(data)
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        struct.pack_into("<I", data, pos + 24, fake_size)
        pos = data.find(b"PK\x01\x02", pos + 4)
    return bytes(data)


def test_zip_member_larger_than_declared_is_not_written(tmp_path, dest):
    real = bytes(8 << 20)
    data = _understate_zip_sizes(zip_bytes([("adapter_model.safetensors", real)]), 100)
    assert zipfile.ZipFile(io.BytesIO(data)).infolist()[0].file_size == 100  # the lie passes the declared checks
    with pytest.raises(UploadError) as exc_info:
        upload_archive("liar.zip", data, dest, max_total_bytes=1 << 20)
    # zipfile stops at the declared size and then fails the CRC: never more than 100 bytes read
    assert_refused(exc_info, 422, "corrupt_archive", "'liar.zip' could not be read")
    assert_clean(tmp_path, dest)


def test_actual_bytes_are_counted_even_when_the_reader_exceeds_the_declared_size(tmp_path, dest, monkeypatch):
    # A member reader that ignores the declared size (zipfile does not today): our own count stops it,
    # and the member already extracted before it is removed.
    data = zip_bytes([("adapter_config.json", CONFIG), ("adapter_model.safetensors", b"small")])
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info, *a, **k: (
        io.BytesIO(bytes(8 << 20)) if info.filename.endswith(".safetensors") else real_open(self, info, *a, **k)))
    with pytest.raises(UploadError) as exc_info:
        upload_archive("liar.zip", data, dest, max_total_bytes=1 << 20)
    assert_refused(exc_info, 413, "too_large", "uncompressed contents")
    assert_clean(tmp_path, dest)


@pytest.mark.parametrize("name", ["evil.tar.gz", "evil.tgz", "evil.tar", "evil.zip"])
def test_archive_name_without_archive_content(tmp_path, dest, name):
    with pytest.raises(UploadError) as exc_info:
        upload_archive(name, b"#!/bin/sh\necho not an archive\n" * 50, dest)
    assert_refused(exc_info, 422, "not_an_archive", f"{name!r} is not a tar, tar.gz or zip archive")
    assert_clean(tmp_path, dest)


def test_gzip_that_is_not_a_tar(tmp_path, dest):
    import gzip
    with pytest.raises(UploadError) as exc_info:
        upload_archive("weights.tar.gz", gzip.compress(b"hello" * 1000), dest)
    assert_refused(exc_info, 422, "not_an_archive", "'weights.tar.gz'")
    assert_clean(tmp_path, dest)


def test_truncated_archive_is_corrupt(tmp_path, dest):
    data = tar_bytes([("adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS * 50)])
    with pytest.raises(UploadError) as exc_info:
        upload_archive("cut.tgz", data[: len(data) // 2], dest)
    assert exc_info.value.status == 422 and exc_info.value.code in ("corrupt_archive", "not_an_archive")
    assert_clean(tmp_path, dest)


def test_archive_with_no_files(tmp_path, dest):
    with pytest.raises(UploadError) as exc_info:
        upload_archive("a.zip", zip_bytes([("top/", b""), ("__MACOSX/._x", b"junk")]), dest)
    assert_refused(exc_info, 400, "empty_upload", "contains no files")
    assert_clean(tmp_path, dest)


def test_limits_are_validated():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_files"):
            UploadLimits(max_files=bad)
