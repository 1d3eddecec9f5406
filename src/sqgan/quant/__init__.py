"""Codebook quantizers: FQ (discriminator features), SQ (generator styles), the CLIP prior's Sinkhorn OT."""

from sqgan.quant.common import QuantizerOutput
from sqgan.quant.fq import FeatureQuantizer
from sqgan.quant.sinkhorn import sinkhorn
from sqgan.quant.sq import StyleQuantizer

__all__ = ["FeatureQuantizer", "QuantizerOutput", "StyleQuantizer", "sinkhorn"]
