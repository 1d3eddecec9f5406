"""sqgan: reproducible pipeline for data-efficient GAN research."""

__version__ = "0.1.0"
