"""Placeholder: the study's architectures are registered here."""
