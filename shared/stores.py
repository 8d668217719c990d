"""Where a cache lives: a local folder or an fsspec URL (s3://, gs://, az://, memory://, ...).

Public API (the cache format, extraction and training use only this):

    loc = CacheLocation.of(where, storage_options=None)  # where: str | Path | CacheLocation
    loc.url / str(loc)        the folder path or the URL (no trailing "/")
    loc.is_local              a plain folder (no scheme, or file://): zarr's LocalStore, Path I/O
    loc.path                  the Path of a local location (ValueError for a remote one)
    loc.storage_options       the fsspec options (credentials, endpoint_url, ...) of a remote one
    loc / "a/b", loc.join("a", "b")   the location of a key below (same options)
    loc.name                  the last part of the path
    loc.exists(rel="")        is there an object (or a non-empty prefix) at rel
    loc.is_file(rel)          is there an object at rel
    loc.read_bytes(rel) / loc.read_text(rel) / loc.read_json(rel)
    loc.write_bytes(rel, data)        whole-object write; local: temp file, fsync, rename
    loc.write_json(rel, obj)          the same for JSON (indent 1, sorted keys)
    loc.sizes(rel="")         {relative key: bytes} of every object below rel (one listing)
    loc.listdir(rel="")       the names directly below rel
    loc.remove(rel="", recursive=False)   delete an object, or everything below rel
    loc.makedirs()            create the folder (local) / nothing (object stores)
    loc.zarr_store(read_only) zarr.storage.LocalStore or zarr.storage.FsspecStore of the location
    loc.open_group(rel, mode) / loc.open_array(rel, mode)   zarr v3 nodes below the location
    loc.check_access()        a cheap request first, so a bad bucket or credentials are one UserError
    parse_storage_options(text)  JSON text of --storage-options -> dict (UserError on bad JSON)

Remote credentials and endpoint come from the filesystem's usual environment (for s3://:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION and
AWS_ENDPOINT_URL; for gs://: GOOGLE_APPLICATION_CREDENTIALS) or from `storage_options`
(s3fs: key, secret, token, endpoint_url, client_kwargs={"region_name": ...}). A location
pickles as its URL and options, so DataLoader workers and other ranks can reopen it.
Filesystem errors (missing bucket, no credentials, unreachable endpoint, a protocol whose
package is not installed) come out of these methods as one-line UserErrors.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from shared.errors import UserError

_FIXES = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_ENDPOINT_URL for a non-AWS server, "
          "or pass --storage-options '{\"key\": ..., \"secret\": ..., \"endpoint_url\": ...}'",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or pass --storage-options '{\"token\": \"/path/to/key.json\"}'",
}
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def parse_storage_options(text: str | None) -> dict:
    """The --storage-options JSON object (empty when not given)."""
    if text is None or text.strip() == "":
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise UserError(f"--storage-options is not valid JSON ({err.msg} at character {err.pos}); "
                        "pass an object such as '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'") from None
    if not isinstance(value, dict):
        raise UserError("--storage-options must be a JSON object such as '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    return value


def _scheme(url: str) -> str | None:
    """The URL scheme, or None for a plain path (a Windows drive letter is no scheme)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep and len(head) > 1 and "/" not in head else None


class CacheLocation:
    """A cache folder, local or on object storage, with the few operations the cache needs."""

    def __init__(self, where: str | Path, storage_options: dict | None = None):
        url = os.fspath(where)
        scheme = _scheme(url)
        if scheme == "file":
            url, scheme = url[len("file://"):], None
        self.scheme = scheme
        self.storage_options: dict = dict(storage_options or {})
        if scheme is None:
            self._path: Path | None = Path(url)
            self.url = str(self._path)
        else:
            self._path = None
            self.url = url.rstrip("/")
            if not url.partition("://")[2].strip("/"):
                raise UserError(f"{url!r} names no bucket; pass a URL such as {scheme}://bucket/prefix")

    @classmethod
    def of(cls, where: str | Path | CacheLocation, storage_options: dict | None = None) -> CacheLocation:
        """`where` as a location (a location is returned as it is unless new options are given)."""
        if isinstance(where, CacheLocation):
            return where if not storage_options else cls(where.url, {**where.storage_options, **storage_options})
        return cls(where, storage_options)

    # --- naming -------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return self._path is not None

    @property
    def path(self) -> Path:
        if self._path is None:
            raise ValueError(f"{self.url} is not a local folder")
        return self._path

    @property
    def name(self) -> str:
        return self._path.name if self._path is not None else self.url.rsplit("/", 1)[-1]

    def join(self, *parts: str) -> CacheLocation:
        rel = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
        if not rel:
            return self
        if self._path is not None:
            return CacheLocation(self._path / rel)
        return CacheLocation(f"{self.url}/{rel}", self.storage_options)

    def __truediv__(self, rel: str) -> CacheLocation:
        return self.join(rel)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"CacheLocation({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheLocation) and (other.url, other.storage_options) == (self.url, self.storage_options)

    def __hash__(self) -> int:
        return hash(self.url)

    def __getstate__(self) -> dict:
        return {"url": self.url if self._path is None else str(self._path), "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["storage_options"])

    # --- the filesystem -----------------------------------------------------------------

    @functools.cached_property
    def _fs_root(self) -> tuple[Any, str]:
        import fsspec

        try:
            return fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError:
            package = _PACKAGES.get(self.scheme or "", f"the fsspec package for {self.scheme}://")
            raise UserError(f"{self.url}: reading {self.scheme}:// needs {package}; pip install {package}") from None
        except (ValueError, TypeError) as err:
            raise UserError(f"{self.url}: {err}; check the URL and --storage-options") from None

    @property
    def fs(self):
        """The fsspec filesystem of a remote location."""
        return self._fs_root[0]

    def _key(self, rel: str = "") -> str:
        root = self._fs_root[1].rstrip("/")
        rel = rel.strip("/")
        return f"{root}/{rel}" if rel else root

    def _local(self, rel: str = "") -> Path:
        return self.path / rel if rel else self.path

    def _call(self, what: str, fn, *args, **kwargs):
        """Run a filesystem call, turning the usual remote failures into one-line UserErrors."""
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except FileNotFoundError:
            raise
        except PermissionError as err:
            raise UserError(f"{self.url}: access denied ({_first_line(err)}); {self._fix()}") from None
        except Exception as err:  # botocore / gcsfs / aiohttp errors have no common base
            raise self.translate(err, what) from None

    def _fix(self) -> str:
        return _FIXES.get(self.scheme or "", "check the credentials in the environment or --storage-options")

    def translate(self, err: BaseException, what: str = "access") -> UserError:
        """A one-line UserError naming the problem with this location and the fix."""
        name = type(err).__name__
        text = _first_line(err)
        if isinstance(err, TypeError) and "argument" in text:
            return UserError(f"{self.url}: a --storage-options entry is not an option of {self.scheme}:// ({text}); "
                             "fix or drop it")
        if "NoCredentials" in name or "credential" in text.lower():
            return UserError(f"{self.url}: no credentials found; {self._fix()}")
        if "EndpointConnection" in name or "ConnectTimeout" in name or "ClientConnector" in name or "connect" in text.lower():
            endpoint = self.storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
            return UserError(f"{self.url}: cannot reach {endpoint} ({text}); check the network, AWS_ENDPOINT_URL "
                             "or --storage-options' endpoint_url")
        if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            return UserError(f"{self.url}: the bucket does not exist; create it first or fix the URL")
        if "AccessDenied" in text or "Forbidden" in text or "403" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
            return UserError(f"{self.url}: access denied ({text}); {self._fix()}")
        return UserError(f"{self.url}: could not {what} ({name}: {text})")

    def check_access(self) -> None:
        """One cheap request, so a missing bucket, bad credentials or an unreachable endpoint fail first, in one line."""
        if self._path is not None:
            return
        bucket = self._key().split("/", 1)[0]
        try:
            self._call("list the bucket", self.fs.ls, bucket, detail=False)
        except FileNotFoundError:
            raise UserError(f"{self.url}: the bucket {bucket!r} does not exist; create it first or fix the URL") from None

    # --- objects ------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        if self._path is not None:
            return self._local(rel).exists()
        self.fs.invalidate_cache(self._key(rel))  # other processes write here too: never trust a cached listing
        return bool(self._call("check", self.fs.exists, self._key(rel)))

    def is_file(self, rel: str) -> bool:
        if self._path is not None:
            return self._local(rel).is_file()
        self.fs.invalidate_cache(self._key(rel))
        return bool(self._call("check", self.fs.isfile, self._key(rel)))

    def read_bytes(self, rel: str) -> bytes:
        if self._path is not None:
            return self._local(rel).read_bytes()
        return self._call("read", self.fs.cat_file, self._key(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str):
        return json.loads(self.read_text(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object: locally a temporary file, fsync, rename; remotely one PUT (atomic on S3 and GCS)."""
        if self._path is not None:
            path = self._local(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            return
        self._call("write", self.fs.pipe_file, self._key(rel), bytes(data))

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))

    def sizes(self, rel: str = "") -> dict[str, int]:
        """{key relative to rel: size in bytes} of every object below rel ({} when there is none)."""
        if self._path is not None:
            base = self._local(rel)
            if not base.is_dir():
                return {}
            return {p.relative_to(base).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()}
        root = self._key(rel)
        self.fs.invalidate_cache(root)
        try:
            found = self._call("list", self.fs.find, root, detail=True)
        except FileNotFoundError:
            return {}
        return {k[len(root) + 1:]: int(v.get("size") or 0) for k, v in found.items() if k.startswith(root + "/")}

    def listdir(self, rel: str = "") -> list[str]:
        if self._path is not None:
            base = self._local(rel)
            return sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        self.fs.invalidate_cache(self._key(rel))
        try:
            found = self._call("list", self.fs.ls, self._key(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(k.rstrip("/").rsplit("/", 1)[-1] for k in found)

    def remove(self, rel: str = "", recursive: bool = False) -> None:
        """Delete the object at rel, or with `recursive` everything below it; nothing there is no error."""
        if self._path is not None:
            import shutil

            path = self._local(rel)
            if path.is_dir() and recursive:
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
            return
        try:
            self._call("delete", self.fs.rm, self._key(rel), recursive=recursive)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def makedirs(self) -> None:
        if self._path is not None:
            self._path.mkdir(parents=True, exist_ok=True)

    # --- zarr ---------------------------------------------------------------------------

    def zarr_store(self, read_only: bool = False):
        """zarr's own store of the location: LocalStore for a folder, FsspecStore for a URL."""
        import zarr.storage

        if self._path is not None:
            return zarr.storage.LocalStore(self._path, read_only=read_only)
        try:
            return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=read_only)
        except ImportError:
            package = _PACKAGES.get(self.scheme or "", f"the fsspec package for {self.scheme}://")
            raise UserError(f"{self.url}: reading {self.scheme}:// needs {package}; pip install {package}") from None

    def open_group(self, rel: str = "", mode: str = "r"):
        """The zarr v3 group at rel (never probes v2 keys)."""
        import zarr

        if self._path is not None:
            return zarr.open_group(str(self._local(rel)), mode=mode, zarr_format=3)
        return zarr.open_group(self.join(rel).zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)

    def open_array(self, rel: str, mode: str = "r"):
        """The zarr v3 array at rel."""
        import zarr

        if self._path is not None:
            return zarr.open_array(str(self._local(rel)), mode=mode, zarr_format=3)
        return zarr.open_array(self.join(rel).zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:200]
