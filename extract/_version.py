"""The package's version, in a module of its own: `extract/__init__.py` and `runner` both
read it, and neither imports the other for it (pyproject.toml reads it statically)."""

__version__ = "0.1.0"
DISTRIBUTION = "bottleneck-features"  # the name pyproject.toml installs the package under


def version() -> str:
    """The installed package's version (what `--version` prints), "unknown" if not installed."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
