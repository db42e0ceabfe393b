"""DSpark draft training: data, trainer and checkpoints. Importing the submodules imports torch."""
