"""The pod VM side: caa-forwarder (ttrpc relay to kata-agent over mTLS) and caa-process-user-data.

Kept import-light: the forwarder's start time and RSS matter, so submodules import heavy things lazily.
"""
