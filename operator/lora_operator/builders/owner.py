"""The owner of every child: the LoRATrainingJob, seen through the few fields builders need."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api import API_VERSION, KIND

# Annotations that must not leak into the trainer's config (large, or kopf/kubectl bookkeeping).
_DROPPED_ANNOTATION_PREFIXES = ("kubectl.kubernetes.io/", "kopf.zalando.org/", "kopf.lora.dev/")


def trainer_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in annotations.items() if not k.startswith(_DROPPED_ANNOTATION_PREFIXES)}


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        meta = body.get("metadata", {})
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace", "default"),
            uid=meta.get("uid", ""),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
        )

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
