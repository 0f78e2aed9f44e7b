"""Datasets: Arrow schemas and the readers for MMEB dumps, JSONL and the hub."""
