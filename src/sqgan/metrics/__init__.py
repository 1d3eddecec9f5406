"""Metrics: the one evaluation of a generator (`evaluate`: FID, KID, IS, precision/recall, LPIPS with their
provenance; names in `names`, feature networks in `features`), codebook usage, embedding diversity."""
