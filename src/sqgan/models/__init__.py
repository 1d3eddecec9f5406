"""Generators and discriminators."""
