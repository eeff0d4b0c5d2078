"""Evaluation room: held-out loss and generation checks for base and adapter, and the gate.

`gate` and `generation` import no torch (import-linter), so the verdict and the check table are
testable and importable cheaply; `scoring` runs the models.
"""
