"""Training stages: text-only projection (stage 1) and LoRA adapters on image-text pairs (stage 2)."""
