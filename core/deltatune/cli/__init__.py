"""The ``deltatune`` command: the Lightning CLI subcommands and deltatune's own (``plugins``,
``registry``, ``report``, ``generate``, ``export``, ``estimate``, ``new-plugin``).

The top layer: may import anything in the core.
"""
