"""
fedhub's Bugzilla producer plugins, found by name with
C{twisted.plugin.getPlugins}: C{bugzilla-smtp} (Bugzilla notification mail
received over SMTP).

Importing this module imports C{fedhub.producers.bugzilla.producer} and what
its configuration keys need (the enrichment's web service client); the SMTP
server (and C{twisted.mail}) is imported when a listener is built.
"""

from fedhub.producers.bugzilla.producer import BugzillaSMTPPlugin

bugzilla_smtp = BugzillaSMTPPlugin()
