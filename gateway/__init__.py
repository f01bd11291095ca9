"""The HTTP side of enginegate: OpenAI API, auth, proxy, metrics, CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("enginegate")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
