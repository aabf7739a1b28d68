"""Model side: loading (local dir, hub id, GGUF), loss, generation."""
