"""One module per supervision regime; each exposes train / evaluate / predict functions."""
