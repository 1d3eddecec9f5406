"""One module per `sqgan` command (`sqgan.cli` only wires them)."""
