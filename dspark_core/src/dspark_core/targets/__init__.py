"""Embedded targets: a corpus that ships with Python, a BPE tokenizer with a chat template, a
family-agnostic pretraining loop, and ``make_tiny_target`` that puts them together.

Torch-free at import; each module imports torch and transformers only when it runs.
"""
