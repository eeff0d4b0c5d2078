"""Publishing a verified artifact set so that readers never see a partial one.

Layout under spec.output.uri:

    published/<release>/adapter/ merged/ eval.json   one folder per publish, never modified after
    lora-metadata.json                               the pointer: names one release, written last

A publish uploads a new `published/<release>/` (a name never used before), then replaces
`lora-metadata.json` with one PUT (atomic on S3; `os.replace` on a local store). So at every
instant the pointer names either the previous complete set or the new complete set: a crash or
SIGTERM before the PUT leaves the previous release published and an unreferenced folder that the
next publish deletes; a crash after it leaves the new release published. After the PUT, releases
other than the new one and the one the previous pointer named (a reader may still be downloading
it) are deleted, as are `adapter/` and `merged/` at the top of the prefix (the layout before
releases).

The pointer also records the job identity (identity.py); a publish over a prefix whose pointer
names another job is refused.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from . import identity as ident
from . import storage, strictjson

log = logging.getLogger(__name__)

POINTER = "lora-metadata.json"
RELEASES = "published"
LEGACY_PARTS = ("adapter", "merged")


def read_pointer(store, output_key: str) -> Optional[dict]:
    """The current lora-metadata.json, or None when nothing is published."""
    try:
        raw = store.get_bytes(storage.join(output_key, POINTER))
    except storage.NotFound:
        return None
    try:
        data = strictjson.loads(raw)
    except ValueError:
        return {}  # unreadable: records no identity, so check_owner refuses it
    return data if isinstance(data, dict) else {}


def check_owner(store, output_key: str, mine: ident.JobIdentity) -> Optional[dict]:
    """Refuse (ForeignPrefix) when the published set belongs to another job; returns the pointer."""
    pointer = read_pointer(store, output_key)
    if pointer is not None:
        ident.check_owner(mine, ident.JobIdentity.from_dict(pointer), f"published {POINTER}",
                          store.describe(output_key))
    return pointer


def new_release(run_id: str) -> str:
    return f"{run_id}-{uuid.uuid4().hex[:8]}"


def release_uris(store, output_key: str, release: str, local: Path) -> dict[str, Optional[str]]:
    base = storage.join(output_key, RELEASES, release)
    return {
        "adapter": store.describe(storage.join(base, "adapter")) if (local / "adapter").is_dir() else None,
        "merged": store.describe(storage.join(base, "merged")) if (local / "merged").is_dir() else None,
        "eval": store.describe(storage.join(base, "eval.json")),
        "metadata": store.describe(storage.join(output_key, POINTER)),
    }


def promote(store, local: Path, output_key: str, release: str, mine: ident.JobIdentity,
            metadata: Callable[[dict], dict[str, Any]]) -> dict[str, Optional[str]]:
    """Upload `local` as `published/<release>/`, then point lora-metadata.json at it.

    `metadata(uris)` builds the pointer document; the job identity is added here.
    """
    previous = check_owner(store, output_key, mine)
    base = storage.join(output_key, RELEASES, release)
    storage.upload_dir(store, local, base)
    uris = release_uris(store, output_key, release, local)
    doc = {**metadata(uris), **mine.to_dict(), "release": release}
    store.put_bytes(storage.join(output_key, POINTER), strictjson.dump_bytes(doc, indent=1, sort_keys=True))
    _collect(store, output_key, keep={release, (previous or {}).get("release")})
    return uris


def _collect(store, output_key: str, keep: set) -> None:
    """Delete releases nobody can be reading any more, and the pre-release top-level layout."""
    root = storage.join(output_key, RELEASES)
    try:
        names = {key[len(root) + 1:].split("/", 1)[0] for key in store.list(root)}
        for name in sorted(names - keep):
            store.delete_prefix(storage.join(root, name))
        for part in LEGACY_PARTS:
            store.delete_prefix(storage.join(output_key, part))
    except Exception as exc:  # the new release is published; leftovers only cost space
        log.warning("could not delete old releases under %s: %s", store.describe(root), exc)
