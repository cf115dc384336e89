"""The engine: the model, the ELECTRA objective, the optimizer, one training step, the loop, checkpoints, metrics
and export. Everything a run needs, and nothing a tool needs on top."""
