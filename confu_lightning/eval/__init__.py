"""Evaluation: prompt sets for measuring drafts (`prompts`: built-in, SpecBench / MT-bench and ShareGPT sources)."""
