"""The package version, in one place (the package, its CLI and saved profiles read it)."""

__version__ = "0.1.0"
