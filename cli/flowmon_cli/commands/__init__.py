"""The real `flowmon` subcommands, one module each; importing this package registers them in the CLI.

Each module imports its heavy dependencies (BCC, rich, aiohttp) inside the handler, so that
`flowmon validate` in a CI job starts in a fraction of a second.
"""

from flowmon_cli.commands import agent, demo, map, operator, render, top, validate

__all__ = ["agent", "demo", "map", "operator", "render", "top", "validate"]
