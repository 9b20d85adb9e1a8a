"""The `farm` command line: sits on top of every package; nothing imports it."""
