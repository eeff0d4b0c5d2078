"""Content-addressed caches of derived results (tokenized data, base-model evaluation).

An entry is a payload plus a strict-JSON manifest `{format, kind, key, sha256, bytes, ...}`, named by
its key: `<dir>/<kind>-<key>.<ext>` and `<dir>/<kind>-<key>.json`. The key is a SHA-256 over every
input that changes the result (the caller's job), so an entry can only ever be reused for the exact
inputs it was computed from.

Nothing read back is trusted: the manifest must be strict JSON naming this kind, this format and
this key, and the payload must have the manifest's length and SHA-256. Anything else (missing,
corrupt, foreign, stale format) is a miss: logged and recomputed, never used, never an error.
Entries live in two places, both optional: the work dir (this pod) and `<output>/cache/` (a retry or
a resumed attempt on a new pod finds them; only rank 0 writes there). Writing is best effort: a
cache that cannot be written costs time on the next attempt, not this one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import storage, strictjson

log = logging.getLogger(__name__)


CACHE_DIR = "cache"  # the entries' folder, in the work dir and under the job's output prefix


def places(work_dir: Path, store: Optional[storage.Store] = None, output_key: str = "") -> dict:
    """Where a job's entries live: `<work dir>/cache` and, with a store, `<output>/cache`
    (the keyword arguments of the `*_cache` constructors)."""
    return {"local_dir": Path(work_dir) / CACHE_DIR, "store": store,
            "prefix": storage.join(output_key, CACHE_DIR) if store is not None else ""}


def digest(value: Any) -> str:
    """SHA-256 (hex) of `value` as canonical strict JSON (sorted keys, no whitespace)."""
    raw = strictjson.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class Cache:
    """Where entries of one kind are looked up and kept: a local directory and/or a store prefix."""

    kind: str  # e.g. "tokens", "base-eval": the file name prefix and the manifest's `kind`
    fmt: int  # format version: bump it when the payload's meaning changes
    ext: str  # payload file extension
    local_dir: Optional[Path] = None
    store: Optional[storage.Store] = None
    prefix: str = ""  # key prefix in `store`, e.g. "<output>/cache"
    write_remote: bool = False  # rank 0 only

    def _names(self, key: str) -> tuple[str, str]:
        base = f"{self.kind}-{key}"
        return f"{base}.{self.ext}", f"{base}.json"

    def load(self, key: str) -> Optional[tuple[bytes, dict]]:
        """(payload, manifest) of the entry for `key`, verified; None when there is none usable."""
        for where, get in self._readers():
            try:
                found = self._verified(key, get)
            except storage.NotFound:
                continue
            except Exception as exc:  # corrupt, foreign, unreadable: recompute, never use
                log.warning("ignoring the %s cache entry %s in %s: %s", self.kind, key[:12], where, exc)
                continue
            log.info("%s cache hit in %s (%s)", self.kind, where, key[:12])
            if where != "work dir":
                self._put_local(key, *found)
            return found
        return None

    def save(self, key: str, payload: bytes, extra: Optional[dict] = None) -> None:
        """Keep an entry locally and (rank 0) under the output prefix; failures are logged only."""
        manifest = {**(extra or {}), "format": self.fmt, "kind": self.kind, "key": key,
                    "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        self._put_local(key, payload, manifest)
        if self.store is not None and self.write_remote:
            data, meta = self._names(key)
            try:
                self.store.put_bytes(storage.join(self.prefix, data), payload)
                self.store.put_bytes(storage.join(self.prefix, meta), strictjson.dump_bytes(manifest))
            except Exception as exc:
                log.warning("could not write the %s cache entry to %s: %s", self.kind,
                            self.store.describe(self.prefix), exc)

    def _put_local(self, key: str, payload: bytes, manifest: dict) -> None:
        if self.local_dir is None:
            return
        data, meta = self._names(key)
        try:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            (self.local_dir / data).write_bytes(payload)
            (self.local_dir / meta).write_bytes(strictjson.dump_bytes(manifest))
        except OSError as exc:
            log.warning("could not write the %s cache entry to %s: %s", self.kind, self.local_dir, exc)

    def _readers(self):
        if self.local_dir is not None:
            def local(name: str) -> bytes:
                try:
                    return (self.local_dir / name).read_bytes()
                except FileNotFoundError:
                    raise storage.NotFound(name) from None
            yield "work dir", local
        if self.store is not None:
            yield (self.store.describe(self.prefix),
                   lambda name: self.store.get_bytes(storage.join(self.prefix, name)))

    def _verified(self, key: str, get) -> tuple[bytes, dict]:
        data, meta = self._names(key)
        manifest = strictjson.loads(get(meta))
        if not isinstance(manifest, dict):
            raise ValueError("manifest is not a JSON object")
        for field, want in (("kind", self.kind), ("format", self.fmt), ("key", key)):
            if manifest.get(field) != want:
                raise ValueError(f"manifest {field} is {manifest.get(field)!r}, expected {want!r}")
        payload = get(data)
        if len(payload) != manifest.get("bytes"):
            raise ValueError(f"payload has {len(payload)} bytes, manifest says {manifest.get('bytes')}")
        if hashlib.sha256(payload).hexdigest() != manifest.get("sha256"):
            raise ValueError("payload does not match the manifest's sha256")
        return payload, manifest
