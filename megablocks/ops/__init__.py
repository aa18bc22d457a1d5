"""Autograd-aware ops, one family per file, each with a plain-torch reference."""
