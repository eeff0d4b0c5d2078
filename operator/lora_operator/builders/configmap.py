"""The trainer's config: the whole manifest with defaults resolved, and no secret values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from ..api import API_VERSION, KIND, LoRATrainingJobSpec
from .names import CONFIG_FILE, configmap_name, labels
from .owner import Owner, trainer_annotations

# libyaml's emitter where PyYAML was built with it (the wheels are): PyYAML's pure-Python emitter
# took 2.2 ms of CPU per job's config, about a fifth of the operator's CPU per start while a
# thousand jobs arrive; libyaml takes 0.5 ms. The same YAML either way (long escaped strings
# may fold differently).
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def trainer_manifest(owner: Owner, spec: LoRATrainingJobSpec, *, image: str, endpoint: str | None,
                     champion: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The LoRATrainingJob as the trainer should see it: every default filled in, plus the champion
    the operator resolved for spec.evaluation.gate.champion (outside spec: it is not user input)."""
    resolved = spec.model_copy(deep=True)
    resolved.image = image
    if endpoint and not resolved.storage.endpoint:
        resolved.storage.endpoint = endpoint
    metadata: dict[str, Any] = {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid}
    if owner.labels:
        metadata["labels"] = dict(owner.labels)
    annotations = trainer_annotations(owner.annotations)
    if annotations:
        metadata["annotations"] = annotations
    manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": resolved.to_wire()}
    if champion is not None:
        manifest["champion"] = dict(champion)
    return manifest


def build_configmap(owner: Owner, spec: LoRATrainingJobSpec, *, image: str, endpoint: str | None,
                    champion: Mapping[str, Any] | None = None) -> dict[str, Any]:
    manifest = trainer_manifest(owner, spec, image=image, endpoint=endpoint, champion=champion)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(owner.name),
            "namespace": owner.namespace,
            "labels": labels(owner.name, "config"),
            "ownerReferences": [owner.reference()],
        },
        "data": {CONFIG_FILE: yaml.dump(manifest, Dumper=_DUMPER, sort_keys=True)},
    }
