"""Backbones, prompt templates and batched embedding."""
