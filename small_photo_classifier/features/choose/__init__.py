"""Model selection by evidence: cross-validation, the sweep, the linear probe, paired comparisons, the bag."""
