"""The views layer: what people read of a run (report.html, plots, summaries); imports
only the base layer."""
