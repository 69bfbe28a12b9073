"""A PI Web API simulator: REST and channels on one loopback port, with deterministic values."""
