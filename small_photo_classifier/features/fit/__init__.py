"""Training: the settings, the one head training loop, the heads stage, the fine-tuning."""
