"""
The C{fedhub} command line: C{fedhub COMMAND [options]}.
"""

from fedhub.cli.main import main

__all__ = ["main"]
