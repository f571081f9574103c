"""Pools as tenants: usage accounting, limits, and fair admission (pure decisions)."""
