"""Model files and what a peer checks about them: the registry, pulling, GGUF facts, signatures,
weights digests and shape twins."""
