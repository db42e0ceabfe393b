"""dspark-qwen3: DSpark draft models for Qwen3 and Qwen3-MoE targets."""
