"""torch.fx plumbing: tracing with fallbacks, finding norm layers and their neighbours, checks."""
