"""The plugin system: hook specifications, the plugin protocols with their one table of kinds, the
plugin manager (entry points, allow/deny lists, broken-plugin isolation), resolution of a
``{name, config}`` reference into a validated plugin, and ``registry.toml``.

May import: :mod:`deltatune.errors`, :mod:`deltatune.ui`. Nothing here loads a model.
"""
