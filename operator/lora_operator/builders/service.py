"""Headless Service giving multi-node pods stable DNS names (`<job>-<index>.<service>`)."""

from __future__ import annotations

from typing import Any

from .names import labels, selector_labels, service_name
from .owner import Owner

MAIN_PORT = 29500


def build_service(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(owner.name),
            "namespace": owner.namespace,
            "labels": labels(owner.name, "workers"),
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rank 0 must resolve before it is Ready
            "selector": selector_labels(owner.name),
            "ports": [{"name": "rendezvous", "port": MAIN_PORT, "targetPort": MAIN_PORT}],
        },
    }
