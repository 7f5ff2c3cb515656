"""
The hub's operator surface: Prometheus metrics, health checks and a live
status page over HTTP.

L{StatusService} serves C{/live}, C{/ready}, C{/metrics} and the status
page C{/} for one hub; L{HubMonitor} watches the hub and holds the metrics
registry.  See L{fedhub.status.web} for the resources.
"""

from fedhub.status.metrics import Activity, HubMonitor, Readiness, readiness
from fedhub.status.web import CONTENT_SECURITY_POLICY, RecentMessages, StatusService

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "Activity",
    "HubMonitor",
    "Readiness",
    "RecentMessages",
    "StatusService",
    "readiness",
]
