"""Shared foundations: the config mechanism (knobs), user-facing errors, self-describing artifacts,
runtime (seeding, devices, logging)."""
