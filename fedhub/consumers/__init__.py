"""
Consumers: the runner that feeds messages to consumer plugins, and the
built-in consumer plugins.
"""
