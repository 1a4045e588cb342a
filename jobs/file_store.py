"""The object store on a local or shared filesystem (file:// URLs)."""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from jobs.errors import UserError
from jobs.store import TEMP_MARK, NotFound, Store, check_key, check_prefix, is_hidden


class FileStore(Store):
    """A folder on a local or shared filesystem."""

    def __init__(self, root: str | Path) -> None:
        if not str(root):
            raise UserError("a file:// store URL needs a path")
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # check_key rules out "..", but a symlink inside the root could still lead out of it.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"object key {key!r} resolves outside the store root")
        return path

    def _publish(self, path: Path, write_temp) -> None:
        """Write through write_temp(temp_path), then rename over path (atomic on POSIX).

        Unlike an S3 PutObject, a file being written is visible half-done under its name, so
        here the temporary file and the rename are what make a write whole or absent.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"{TEMP_MARK}{uuid.uuid4().hex}-{path.name}")
        try:
            write_temp(temp)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        def write(temp: Path) -> None:
            with open(temp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())  # the rename must never publish unwritten data

        self._publish(self._path(key), write)

    def create_once(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A hidden temp file linked to the final name: link(2) is atomic and fails if the
        # name exists, so the write is exclusive and never seen half-done.
        temp = path.with_name(f"{TEMP_MARK}{uuid.uuid4().hex}-{path.name}")
        try:
            with open(temp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.link(temp, path)
        except FileExistsError:
            return False
        finally:
            temp.unlink(missing_ok=True)
        return True

    def update(self, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The lock is on the folder, not the file: each write renames a new file over it.
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = None
            data = change(current)
            self.put_bytes(key, data)
            return data
        finally:
            os.close(folder)  # releases the lock

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        # Walk only the deepest folder the prefix names, not the whole store.
        folder = self.root / prefix.rpartition("/")[0]
        if not folder.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix) and not is_hidden(key):
                    keys.append(key)
        return sorted(keys)

    def list_dirs(self, prefix: str) -> list[str]:
        folder = self.root / check_prefix(prefix)
        if not folder.is_dir():
            return []
        return sorted(e.name for e in os.scandir(folder)
                      if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def upload_file(self, local_path: str | Path, key: str) -> None:
        self._publish(self._path(key), lambda temp: shutil.copyfile(local_path, temp))

    def download_file(self, key: str, local_path: str | Path) -> None:
        try:
            shutil.copyfile(self._path(key), local_path)
        except FileNotFoundError:
            raise NotFound(key) from None

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(key) from None

    def etag(self, key: str) -> str:
        # Size and modification time: cheap, and a rewrite (a rename of a new file) changes it.
        try:
            info = self._path(key).stat()
        except FileNotFoundError:
            raise NotFound(key) from None
        return f"{info.st_size:x}-{info.st_mtime_ns:x}"
