"""Code both phases import: the cache format, backbone adapters, tasks and metrics."""

__version__ = "0.1.0"
