"""A NetworkPolicy per job: its pods talk to each other, to DNS and to object storage, nothing else.

Why per job: the rendezvous port (29500) and NCCL's ephemeral ports have no authentication, so only
the pods of the same job may reach them (NCCL picks ports at random, hence every port between them).
Egress: DNS, and TCP to the object-store ports (and 443 for an hf:// base model), to any address: the
operator cannot know the store's addresses; a platform narrows them with its own policies. Policies
only ever add allowed traffic, so this one restricts pods that no other policy selects.
Enforced only where the network plugin implements NetworkPolicy.
"""

from __future__ import annotations

from typing import Any

from .names import child_name, labels, selector_labels
from .owner import Owner

DNS_PORT = 53
HTTPS_PORT = 443


def network_policy_name(owner: str) -> str:
    return child_name(owner, "network")


def build_network_policy(owner: Owner, egress_ports: tuple[int, ...]) -> dict[str, Any]:
    same_job = [{"podSelector": {"matchLabels": selector_labels(owner.name)}}]
    dns = [{"protocol": proto, "port": DNS_PORT} for proto in ("UDP", "TCP")]
    egress: list[dict[str, Any]] = [{"to": same_job}, {"ports": dns}]
    if egress_ports:
        egress.append({"ports": [{"protocol": "TCP", "port": p} for p in sorted(set(egress_ports))]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(owner.name),
            "namespace": owner.namespace,
            "labels": labels(owner.name, "network"),
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner.name)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": same_job}],
            "egress": egress,
        },
    }
