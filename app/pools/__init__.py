"""Pools (SIE semantics) and the pool autoscaler's decisions. Pure Python, clocked by the caller."""
