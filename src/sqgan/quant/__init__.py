"""Codebook quantizers: FQ (discriminator features)."""

from sqgan.quant.fq import FeatureQuantizer, QuantizerOutput

__all__ = ["FeatureQuantizer", "QuantizerOutput"]
