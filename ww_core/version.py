"""The version of ``ww_core`` (re-exported as ``ww_core.__version__``), in a module of its own so
that any module can record it without importing the package."""

__version__ = "0.2.0"
