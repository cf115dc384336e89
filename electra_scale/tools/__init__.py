"""Tools built on the engine, through its public functions and hooks: bench, compare, plot and the demo."""
