"""Models: locating and loading them (local, `models:/` references, hub), the safety rules, and the memory plan."""
