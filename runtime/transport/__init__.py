"""Bytes between two processes: segments, rings, the ZeroMQ bulk link, channels.

Nothing here knows about actors, systems or supervisors.
"""
