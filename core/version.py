"""The memwise version, alone in a module so that checkpoint manifests can name it without importing the package."""

__version__ = "0.1.0"
