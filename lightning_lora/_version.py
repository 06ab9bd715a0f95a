"""The package version: the single source read by pyproject.toml and written into adapter files."""

__version__ = "0.1.0"
