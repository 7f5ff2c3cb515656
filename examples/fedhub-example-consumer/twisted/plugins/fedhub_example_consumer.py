"""
The consumer plugins of fedhub-example-consumer, found by name by fedhub
through C{twisted.plugin.getPlugins}.
"""

from fedhub_example_consumer.package_watch import PackageWatchPlugin

package_watch = PackageWatchPlugin()
