"""The train layer: making a run (the job, the stages, backbones, the final model, label
audits, the calibration fitted); imports every other layer."""
