"""The `flowmon` command: a thin layer of subcommands over the other packages.

Imports `flowmon_contract`, `flowmon_agent` and `flowmon_operator` inside each handler; `flowmon demo`
imports `flowmon_lab`, which is not installed in the images.
"""
