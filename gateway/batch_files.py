"""The bytes of the batch API's files: one plain file per id in a directory, written under a
temporary name, fsynced and renamed (then the directory fsynced), so a name on disk always
holds complete bytes. The database row is committed after the rename; a crash in between
leaves an orphan, which `remove_orphans` deletes once it is old enough that no process
sharing the directory can still be writing or committing it."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from collections.abc import Iterable

TMP_PREFIX = ".tmp-"


class FileBytes:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    def write_new(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Write `chunks` (which may raise to refuse them: nothing is left) under a new id;
        returns (id, size)."""
        file_id = "file-" + uuid.uuid4().hex[:24]
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.root)
        num_bytes = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    num_bytes += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp, self.path(file_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a crash before the row commits
        finally:
            os.close(dir_fd)
        return file_id, num_bytes

    def remove(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)

    def remove_orphans(self, known_ids: set[str], min_age_s: float) -> int:
        """Delete files no row names that were last written more than `min_age_s` ago (an
        upload in progress keeps touching its temporary file)."""
        cutoff, removed = time.time() - min_age_s, 0
        for entry in self.root.iterdir():
            try:
                if entry.name not in known_ids and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:  # another process removed or renamed it meanwhile
                pass
        return removed
