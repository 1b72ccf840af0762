"""The ep_jit version: here alone, so no module needs the package root."""

__version__ = "0.1.0"
