"""Ember against the tools a user would pick instead (``benchmarks/peers.py``).

Each peer arm builds its engine from the same Hugging Face LLaMA folder and runs in its own
subprocess (``worker``), so peak RSS, build time and engine size are per arm.
"""
