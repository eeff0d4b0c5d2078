"""Prometheus metrics (an I/O edge: it serves HTTP)."""
