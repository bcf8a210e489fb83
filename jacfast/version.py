"""The package version: the one place it is written (pyproject.toml and jacfast/__init__.py read it)."""
__version__ = "0.1.0"
