"""Runtime backends, one module each."""
