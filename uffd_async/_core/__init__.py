"""The kernel interface: ABI, errors, memory, opening a uffd, decoding its events, reading them.

Everything above builds on this package; it imports nothing of theirs.
"""
