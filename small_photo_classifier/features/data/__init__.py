"""Data-centric tools: the learning curve, which photos to label next (and near-duplicates), labels that look wrong."""
