"""The config schema (typed dataclasses), the task registry, validation, the compact view, and the error classes."""
