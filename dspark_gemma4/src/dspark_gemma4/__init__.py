"""dspark-gemma4: DSpark draft models for Gemma 4 targets."""
