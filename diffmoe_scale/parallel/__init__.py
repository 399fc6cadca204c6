"""Process groups, launcher discovery and the DeepSpeed engine configuration."""
