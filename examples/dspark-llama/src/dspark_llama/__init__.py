"""dspark-llama: DSpark drafts for Llama targets, a declaration of dspark-core's standard backbone."""
