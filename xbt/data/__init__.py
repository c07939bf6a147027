"""Data sources: caption corpora (stage 1) and image-text pairs (stage 2, evaluation)."""
