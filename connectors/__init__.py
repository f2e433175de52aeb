"""Connectors: one sub-package per source. Each observes and returns typed observations;
none signs, stores or sends anything."""
