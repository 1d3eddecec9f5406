"""Metrics: FID/KID with a named feature network, codebook usage."""
