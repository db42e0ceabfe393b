"""Data generation: the target answers prompts, and the prompt sets the project ships.

``regenerate`` (the target's own answers to a chat dataset, in process), ``code_demo`` (the
quickstart's code-completion data from the embedded corpus) and ``demo`` (the built-in English
demo prompts). Importing the submodules imports torch; this package itself does not.
"""
