"""Family-agnostic DSpark draft machinery. Importing this package imports torch."""
