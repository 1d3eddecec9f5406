"""Dataset stages and the manifest Dataset."""
