"""All object-storage I/O of the trainer.

A `Store` is rooted at one bucket (S3) or one directory (local) and addresses objects by
'/'-separated keys. The interface is closed: callers use only the methods of `Store` (never a
client, a bucket or a root directory), so `LocalStore` and `S3Store` are interchangeable and a new
object store is one more class here plus a scheme in `open_uri`. `open_uri` returns every store
wrapped in `RetryingStore` (exponential backoff inside a total time budget of minutes; an answer
such as not found, or a permanent refusal such as no such bucket, is never retried): the retry
policy lives inside the store, callers never retry. This is the only trainer module that imports minio (import-linter).

Keys stay inside: every store refuses a key with a `.` or `..` part, an absolute key, or a NUL
(`UnsafeKey`), so `s3://out/../../x` or `pvc://claim/../../etc/hostname` never reaches a file
outside the bucket or claim. With a storage dir, `s3://bucket/...` needs the directory DIR/bucket
to exist, as S3 needs the bucket (`NoSuchBucket` otherwise).

URIs map to (store, key) in `open_uri`:
  s3://bucket/key   -> S3Store(bucket) or, with a storage dir, LocalStore(DIR/bucket)
  file:///abs/path  -> LocalStore("/"), key "abs/path"
  pvc://claim/path  -> LocalStore(PVC_ROOT/claim), key "path"

Credentials are read from the environment and are never logged or put into error messages.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """Object storage failed for good (after retries) or a URI cannot be served."""


class NotFound(FileNotFoundError):
    """The object does not exist (never retried)."""


class UnsafeKey(StorageError, ValueError):
    """A key that would leave its bucket or directory ('..', '.', absolute, NUL): never served."""


class BucketMissing(StorageError):
    """The bucket (a storage dir's DIR/bucket) does not exist: permanent, never retried."""

    code = "NoSuchBucket"


# S3 error codes that no retry can change; everything else (network, 5xx, throttling) is retried.
PERMANENT_CODES = frozenset({"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                             "InvalidBucketName", "AllAccessDisabled", "AccountProblem"})


def check_key(key: str, what: str = "key") -> str:
    """`key` without surrounding slashes; UnsafeKey when it could escape its root."""
    if "\0" in key or key.startswith("/") or any(part in (".", "..") for part in key.split("/")):
        raise UnsafeKey(f"{what} {key!r} is not allowed: '..', '.', absolute paths and NUL never reach a store")
    return key.strip("/")


class Store(Protocol):
    """Key/value object store. Keys are '/'-separated and never start with '/'.

    A missing object raises `NotFound`; any other failure, once retries are spent, `StorageError`.
    """

    def get_bytes(self, key: str) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...  # readers never see half an object
    def get_file(self, key: str, dest: Path) -> None: ...
    def put_file(self, key: str, src: Path) -> None: ...
    def list(self, prefix: str) -> list[str]: ...  # every key under prefix/ (or the key itself), sorted
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...  # the key itself or everything under prefix/
    def copy(self, src_key: str, dst_key: str) -> None: ...  # within the store; server-side where it can
    # The file behind `key` when the store is a mounted filesystem (file://, pvc://) that may be
    # read in place (it may not exist); None when objects must be downloaded.
    def local_path(self, key: str) -> Path | None: ...
    def describe(self, key: str) -> str: ...  # the object's URI, for messages (never credentials)


def _dir_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


class LocalStore:
    """A directory used as an object store (laptop runs, PVC mounts, tests)."""

    def __init__(self, root: Path | str, uri_base: str | None = None, mounted: bool = True):
        self.root = Path(root)
        self.uri_base = uri_base  # how to name objects in messages, e.g. "s3://bucket"
        # False when the directory stands in for a bucket (--storage-dir): callers then download,
        # exactly as they would from S3.
        self.mounted = mounted

    def _path(self, key: str) -> Path:
        if not self.mounted and not self.root.is_dir():  # stands in for a bucket: never created
            raise BucketMissing(f"NoSuchBucket: {self.uri_base or self.root} does not exist ({self.root})")
        return self.root / check_key(key.rstrip("/"))

    def describe(self, key: str) -> str:
        if self.uri_base:
            return f"{self.uri_base}/{key.strip('/')}"
        return f"file://{self._path(key)}"

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(self.describe(key)) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see a half-written object

    def get_file(self, key: str, dest: Path) -> None:
        src = self._existing(key)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def put_file(self, key: str, src: Path) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix.strip("/")]
        if not base.is_dir():
            return []
        rel_root = prefix.strip("/")
        keys = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                rel = p.relative_to(base).as_posix()
                keys.append(f"{rel_root}/{rel}" if rel_root else rel)
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def copy(self, src_key: str, dst_key: str) -> None:
        self.put_file(dst_key, self._existing(src_key))

    def local_path(self, key: str) -> Path | None:
        return self._path(key) if self.mounted else None

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(self.describe(key))
        return path


class S3Store:
    """One bucket of an S3-compatible service, through the minio client."""

    def __init__(self, client, bucket: str):
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_env(cls, bucket: str, endpoint: str | None = None) -> S3Store:
        from minio import Minio

        endpoint = endpoint or os.environ.get("S3_ENDPOINT")
        if not endpoint:
            raise StorageError("no S3 endpoint: set S3_ENDPOINT, spec.storage.endpoint or --storage-dir")
        url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        client = Minio(
            url.netloc,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
            secure=url.scheme == "https",
            region=os.environ.get("AWS_REGION") or None,
        )
        return cls(client, bucket)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key.strip('/')}"

    def _key(self, key: str) -> str:
        return check_key(key.rstrip("/"))

    def _not_found(self, exc: Exception) -> bool:
        return getattr(exc, "code", None) in ("NoSuchKey", "NoSuchBucket", "NoSuchObject")

    def get_bytes(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            resp = self.client.get_object(self.bucket, self._key(key))
        except S3Error as exc:
            if self._not_found(exc):
                raise NotFound(self.describe(key)) from None
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data))

    def get_file(self, key: str, dest: Path) -> None:
        from minio.error import S3Error

        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.fget_object(self.bucket, self._key(key), str(dest))
        except S3Error as exc:
            if self._not_found(exc):
                raise NotFound(self.describe(key)) from None
            raise

    def put_file(self, key: str, src: Path) -> None:
        self.client.fput_object(self.bucket, self._key(key), str(src))

    def list(self, prefix: str) -> list[str]:
        from minio.error import S3Error

        key = self._key(prefix)
        try:
            objs = self.client.list_objects(self.bucket, prefix=_dir_prefix(key), recursive=True)
            keys = sorted(o.object_name for o in objs if not o.is_dir)
        except S3Error as exc:
            if self._not_found(exc):
                return []
            raise
        if not keys and key and self.exists(key):
            return [key]
        return keys

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._key(key))
            return True
        except S3Error as exc:
            if self._not_found(exc) or exc.code in ("NoSuchKey", "NotFound", "ResourceNotFound"):
                return False
            raise

    def delete_prefix(self, prefix: str) -> None:
        from minio.deleteobjects import DeleteObject

        keys = self.list(prefix)
        errors = list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
        if errors:
            raise StorageError(f"could not delete {len(errors)} objects under {self.describe(prefix)}")

    def copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy: the bytes never pass through this process (minio switches to a
        multipart copy above 5 GiB)."""
        from minio.commonconfig import CopySource
        from minio.error import S3Error

        try:
            self.client.copy_object(self.bucket, self._key(dst_key),
                                    CopySource(self.bucket, self._key(src_key)))
        except S3Error as exc:
            if self._not_found(exc):
                raise NotFound(self.describe(src_key)) from None
            raise

    def local_path(self, key: str) -> Path | None:
        return None


class RetryingStore:
    """Wraps a store: every call is retried with exponential backoff within a time budget.

    `NotFound`, `UnsafeKey` and permanent S3 refusals (`PERMANENT_CODES`) are answers, not faults,
    and are never retried. Otherwise a call is retried until `attempts` calls were made or the next
    wait would pass `budget_s` seconds since the first try; then it raises `StorageError` naming the
    operation and the object (never credentials).
    """

    def __init__(self, inner: Store, attempts: int = 30, base_delay: float = 0.5,
                 max_delay: float = 30.0, budget_s: float = 300.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.inner = inner
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.budget_s = budget_s
        self.sleep = sleep
        self.clock = clock

    def describe(self, key: str) -> str:
        return self.inner.describe(key)

    def local_path(self, key: str) -> Path | None:
        return self.inner.local_path(key)  # no I/O, nothing to retry

    def _call(self, op: str, key: str, *args):
        start = self.clock()
        for attempt in range(1, self.attempts + 1):
            try:
                return getattr(self.inner, op)(key, *args)
            except (NotFound, UnsafeKey):
                raise
            except Exception as exc:
                delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
                permanent = getattr(exc, "code", None) in PERMANENT_CODES
                spent = attempt == self.attempts or self.clock() - start + delay > self.budget_s
                if permanent or spent:
                    why = "permanent" if permanent else f"failed after {attempt} attempts"
                    raise StorageError(f"{op} {self.describe(key)} {why}: {type(exc).__name__}: {exc}") from exc
                log.warning("%s %s failed (%s); retry %d in %.1fs", op, self.describe(key),
                            type(exc).__name__, attempt, delay)
                self.sleep(delay)

    def get_bytes(self, key):
        return self._call("get_bytes", key)

    def put_bytes(self, key, data):
        return self._call("put_bytes", key, data)

    def get_file(self, key, dest):
        return self._call("get_file", key, dest)

    def put_file(self, key, src):
        return self._call("put_file", key, src)

    def list(self, prefix):
        return self._call("list", prefix)

    def exists(self, key):
        return self._call("exists", key)

    def delete_prefix(self, prefix):
        return self._call("delete_prefix", prefix)

    def copy(self, src_key, dst_key):
        return self._call("copy", src_key, dst_key)


# --- whole prefixes -------------------------------------------------------------------------------


def download_prefix(store: Store, prefix: str, dest: Path) -> list[Path]:
    """Copy every object under `prefix` to `dest`, keeping relative paths."""
    keys = store.list(prefix)
    if not keys:
        raise NotFound(f"nothing under {store.describe(prefix)}")
    base = _dir_prefix(prefix)
    out = []
    for key in keys:
        rel = check_key(key[len(base):] if key.startswith(base) else Path(key).name, "object name")
        path = Path(dest) / rel
        store.get_file(key, path)
        out.append(path)
    return out


def upload_dir(store: Store, src: Path, prefix: str, last: Iterable[str] = ()) -> list[str]:
    """Upload the files of `src` under `prefix`; names in `last` are uploaded after all others."""
    files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    last = set(last)
    files.sort(key=lambda p: p.relative_to(src).as_posix() in last)
    keys = []
    for path in files:
        key = f"{_dir_prefix(prefix)}{path.relative_to(src).as_posix()}"
        store.put_file(key, path)
        keys.append(key)
    return keys


# --- URIs -----------------------------------------------------------------------------------------


def open_uri(uri: str, storage_dir: Path | str | None = None, s3_endpoint: str | None = None,
             pvc_root: Path | str = "/mnt/pvc", retry_attempts: int = 30,
             retry_base_delay_s: float = 0.5, retry_budget_s: float = 300.0) -> tuple[Store, str]:
    """Map a data/model/output URI to (store, key), the store retrying as configured. See the
    module docstring."""
    url = urlparse(uri)
    key = url.path[1:] if url.path.startswith("/") else url.path
    try:
        key = check_key(key)
    except UnsafeKey:
        raise UnsafeKey(f"{uri}: a key with '..', '.' or an absolute path is not allowed") from None
    if url.scheme == "s3":
        if storage_dir:
            store: Store = LocalStore(Path(storage_dir) / url.netloc, uri_base=f"s3://{url.netloc}",
                                      mounted=False)
        else:
            store = S3Store.from_env(url.netloc, s3_endpoint)
    elif url.scheme == "file":
        store = LocalStore("/")
    elif url.scheme == "pvc":
        store = LocalStore(Path(pvc_root) / url.netloc, uri_base=f"pvc://{url.netloc}")
    else:
        raise StorageError(f"unsupported URI scheme for object storage: {uri}")
    return RetryingStore(store, attempts=retry_attempts, base_delay=retry_base_delay_s,
                         budget_s=retry_budget_s), key


def join(prefix: str, *parts: str) -> str:
    """Join key parts with '/'."""
    return "/".join(p.strip("/") for p in (prefix, *parts) if p.strip("/"))


# --- content hashes -------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_dir(root: Path) -> str:
    """`sha256:<hex>` over the sorted relative paths and per-file SHA-256 digests of `root`.

    Hidden files (names starting with '.') are ignored, so download scratch never changes it.
    """
    root = Path(root)
    if root.is_file():
        files = [root]
        root = root.parent
    else:
        files = [p for p in root.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def fingerprint_uri(uri: str, **open_kw) -> str:
    """Fingerprint a local path or any storage URI (remote ones are downloaded to a temp dir)."""
    if "://" not in uri:
        return fingerprint_dir(Path(uri))
    store, key = open_uri(uri, **open_kw)
    local = store.local_path(key)
    if local is not None:
        return fingerprint_dir(local)
    with tempfile.TemporaryDirectory() as tmp:
        download_prefix(store, key, Path(tmp))
        return fingerprint_dir(Path(tmp))
