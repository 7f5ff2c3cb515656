"""
fedhub's built-in consumer and producer plugins, found by name with
C{twisted.plugin.getPlugins}.

Third-party packages add their own the same way: a module under their own
C{twisted/plugins/} holding objects that provide
L{fedhub.interfaces.IConsumerPlugin} or L{fedhub.interfaces.IProducerPlugin}.
"""

from fedhub.consumers.log import LogPlugin

log = LogPlugin()
