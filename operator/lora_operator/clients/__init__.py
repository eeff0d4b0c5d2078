"""I/O edges: the Kubernetes API (kube.py) and object storage (storage.py). Nothing else does I/O."""
