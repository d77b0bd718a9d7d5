"""Monitoring: the event bus that fans events out to sinks."""
