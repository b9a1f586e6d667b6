"""The package version, importable by its modules without importing the package."""

__version__ = "0.1.0"
