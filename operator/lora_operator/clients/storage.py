"""Reads the trainer's progress.json from S3-compatible storage (minio client). Read-only.

Credentials: the operator's own (LORA_S3_ACCESS_KEY_ID/LORA_S3_SECRET_ACCESS_KEY) when configured,
else the job's spec.storage.secretName Secret. They stay in memory, never in status, events or logs.
"""

from __future__ import annotations

import json
import logging
from io import BytesIO
from typing import Any
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import S3Error

log = logging.getLogger(__name__)
PROGRESS_FILE = "progress.json"


def split_s3_uri(uri: str) -> tuple[str, str] | None:
    """s3://bucket/prefix -> (bucket, prefix); None for other schemes (pvc://, file://)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        return None
    return parsed.netloc, parsed.path.strip("/")


class ProgressStore:
    def __init__(self, timeout: float = 10.0):
        self._clients: dict[tuple[str, str | None], Minio] = {}
        self._http = urllib3.PoolManager(
            maxsize=16,  # concurrent progress reads by the workers keep their connections
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=urllib3.Retry(total=1, backoff_factor=0.2),
        )

    def _client(self, endpoint: str, access_key: str | None, secret_key: str | None) -> Minio:
        key = (endpoint, access_key)
        if key not in self._clients:
            url = urlparse(endpoint)
            self._clients[key] = Minio(url.netloc, access_key=access_key, secret_key=secret_key,
                                       secure=url.scheme == "https", http_client=self._http)
        return self._clients[key]

    def read_progress(self, endpoint: str, output_uri: str, access_key: str | None,
                      secret_key: str | None) -> dict[str, Any] | None:
        """progress.json as a dict; None when absent, unreadable or not on S3."""
        location = split_s3_uri(output_uri)
        if location is None:
            return None
        bucket, prefix = location
        key = f"{prefix}/{PROGRESS_FILE}" if prefix else PROGRESS_FILE
        try:
            response = self._client(endpoint, access_key, secret_key).get_object(bucket, key)
            try:
                data = json.loads(response.read())
            finally:
                response.close()
                response.release_conn()
        except S3Error as exc:
            if exc.code not in ("NoSuchKey", "NoSuchBucket"):
                log.warning("cannot read s3://%s/%s: %s", bucket, key, exc.code)
            return None
        except (ValueError, urllib3.exceptions.HTTPError) as exc:
            log.warning("cannot read s3://%s/%s: %s", bucket, key, type(exc).__name__)
            return None
        return data if isinstance(data, dict) else None

    def get_json(self, endpoint: str, uri: str, access_key: str | None, secret_key: str | None,
                 max_bytes: int = 1 << 20) -> Any:
        """A small JSON object at an s3:// URI; None when it does not exist.

        Raises StorageError when it exists but cannot be read, is larger than max_bytes or is not
        JSON: a caller must not take "unreadable" for "absent" (it would overwrite a pointer).
        """
        bucket, key = _bucket_key(uri)
        client = self._client(endpoint, access_key, secret_key)
        try:
            size = client.stat_object(bucket, key).size
            if size is not None and size > max_bytes:
                raise StorageError(f"{uri}: {size} bytes, more than {max_bytes}")
            response = client.get_object(bucket, key)
            try:
                data = response.read(max_bytes + 1)
            finally:
                response.close()
                response.release_conn()
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return None
            raise StorageError(f"{uri}: {exc.code}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise StorageError(f"{uri}: {type(exc).__name__}") from None
        if len(data) > max_bytes:
            raise StorageError(f"{uri}: more than {max_bytes} bytes")
        try:
            return json.loads(data)
        except ValueError:
            raise StorageError(f"{uri}: not JSON") from None

    def put_json(self, endpoint: str, uri: str, document: Any, access_key: str | None,
                 secret_key: str | None) -> None:
        """One PUT: S3 makes a single object visible whole or not at all, never half-written."""
        bucket, key = _bucket_key(uri)
        body = json.dumps(document, indent=1, sort_keys=True).encode()
        try:
            self._client(endpoint, access_key, secret_key).put_object(
                bucket, key, BytesIO(body), len(body), content_type="application/json")
        except S3Error as exc:
            raise StorageError(f"{uri}: {exc.code}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise StorageError(f"{uri}: {type(exc).__name__}") from None


class StorageError(RuntimeError):
    """Object storage answered, but not with what we need (the message names the URI, no secrets)."""


def _bucket_key(uri: str) -> tuple[str, str]:
    location = split_s3_uri(uri)
    if location is None or not location[1]:
        raise StorageError(f"{uri}: not an s3://bucket/key URI")
    return location
