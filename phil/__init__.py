"""Shared PHIL scope files, one per concern."""
