"""Trigger modules whose import raises what a committer must survive (or must not)."""
