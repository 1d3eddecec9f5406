"""Losses: adversarial."""
