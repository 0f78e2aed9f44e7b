"""Contrastive fine-tuning of the backbone: loss, GradCache, the training loop."""
