"""Supervisor daemon for talking-avatar kiosks."""

__version__ = "0.1.0"
