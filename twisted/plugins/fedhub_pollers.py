"""
fedhub's polling producers, found by name with C{twisted.plugin.getPlugins}:

  - C{koji}: a Koji hub's tags, builds, tasks and repos (C{buildsys.*});
  - C{bugzilla}: a Bugzilla's new bugs, changes and comments
    (C{bugzilla.bug.*});
  - C{xmlrpc}: any XML-RPC method that lists what changed, configured in
    the TOML file.
"""

from fedhub.producers.bugzilla_poll import BugzillaPollPlugin
from fedhub.producers.koji import KojiPlugin
from fedhub.producers.xmlrpc_poll import XMLRPCPollPlugin

koji = KojiPlugin()
bugzilla = BugzillaPollPlugin()
xmlrpc = XMLRPCPollPlugin()
