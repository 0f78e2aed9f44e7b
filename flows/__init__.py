"""Prefect flows composing the stage tasks, and the `gen2embed` command line."""
