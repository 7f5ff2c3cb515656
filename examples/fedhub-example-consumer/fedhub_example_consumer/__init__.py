"""
An example fedhub consumer plugin in its own distribution: C{package-watch}.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
