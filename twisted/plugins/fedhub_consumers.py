"""
fedhub's built-in consumer plugins besides C{log} (which is in
C{fedhub_builtins.py}), found by name with C{twisted.plugin.getPlugins}:
C{exec}, C{webhook}, C{record} and C{bridge}.

Importing this module imports their modules only; the HTTP client (treq) is
imported when a webhook consumer starts.
"""

from fedhub.consumers.bridge import BridgePlugin
from fedhub.consumers.exec import ExecPlugin
from fedhub.consumers.record import RecordPlugin
from fedhub.consumers.webhook import WebhookPlugin

exec_ = ExecPlugin()
webhook = WebhookPlugin()
record = RecordPlugin()
bridge = BridgePlugin()
