"""Subcommands of `python -m minimax01`, one module each."""
