"""Decoder-only model definitions and the registry that maps HF architectures to them."""
