"""Producers: turn services without native bus support into fedhub messages."""
