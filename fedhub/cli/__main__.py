"""
C{python -m fedhub.cli}: the same as the C{fedhub} command.
"""

from fedhub.cli import entry

entry()
