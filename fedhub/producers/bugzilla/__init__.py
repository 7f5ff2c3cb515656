"""Bugzilla producer: notification mail ("bugmail") in, structured bug events out."""
