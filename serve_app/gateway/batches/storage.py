"""Where batch file bytes live: a local directory (one machine) or S3-compatible object storage (a cluster), through
fsspec (s3fs for S3), chosen by the gateway config's `batches.storage`.

A file is a sequence of parts, `files/<file id>/part-00000`, `part-00001`, ...; its content is their concatenation.
An upload is one part. A batch's output and error files grow by one part per runner checkpoint, so nothing is ever
appended to (object stores cannot append) or copied at the end, and a resumed runner rewrites the same part name
rather than adding one. Every call here blocks: callers run them off the event loop.
"""

from __future__ import annotations

from typing import IO, Iterator

import fsspec

from serve_app import PROJECT_ROOT
from serve_app.config import LocalFileStorage, S3FileStorage

READ_CHUNK_BYTES = 1 << 20


class FileStorage:
    def __init__(self, config: LocalFileStorage | S3FileStorage):
        if isinstance(config, S3FileStorage):
            client_kwargs = {"region_name": config.region} if config.region else {}
            # skip_instance_cache: each FileStorage owns its client (fsspec would share one per argument set).
            self.fs = fsspec.filesystem("s3", endpoint_url=config.endpoint_url, client_kwargs=client_kwargs,
                                        skip_instance_cache=True, use_listings_cache=False)
            self.root = config.url.removeprefix("s3://").rstrip("/")
            self.where = config.url
        else:
            root = PROJECT_ROOT / config.path if not config.path.startswith("/") else config.path
            self.fs = fsspec.filesystem("file", auto_mkdir=True)
            self.root = str(root).rstrip("/")
            self.where = self.root

    def part_path(self, file_id: str, part: int) -> str:
        return f"{self.root}/files/{file_id}/part-{part:05d}"

    def open_part_for_writing(self, file_id: str, part: int) -> IO[bytes]:
        return self.fs.open(self.part_path(file_id, part), "wb")

    def write_part(self, file_id: str, part: int, data: bytes) -> int:
        with self.open_part_for_writing(file_id, part) as out:
            out.write(data)
        return len(data)

    def open_part(self, file_id: str, part: int) -> IO[bytes]:
        return self.fs.open(self.part_path(file_id, part), "rb")

    def read(self, file_id: str, parts: int, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        """The file's content, streamed part after part."""
        for part in range(parts):
            with self.open_part(file_id, part) as source:
                while chunk := source.read(chunk_bytes):
                    yield chunk

    def remove(self, file_id: str) -> None:
        try:
            self.fs.rm(f"{self.root}/files/{file_id}", recursive=True)
        except FileNotFoundError:
            pass
