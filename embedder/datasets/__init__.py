"""Datasets: Arrow schemas, readers for MMEB dumps / JSONL / the hub, and the miniature world."""
