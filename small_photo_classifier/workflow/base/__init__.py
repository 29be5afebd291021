"""The base layer: flags, configuration, console, run folder, state, clock (imports no
other layer of workflow)."""
