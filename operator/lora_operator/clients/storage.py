"""Reads the trainer's progress.json from S3-compatible storage (minio client). Read-only.

Credentials: the operator's own (LORA_S3_ACCESS_KEY_ID/LORA_S3_SECRET_ACCESS_KEY) when configured,
else the job's spec.storage.secretName Secret. They stay in memory, never in status, events or logs.
"""

from __future__ import annotations

import json
import logging
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
