"""Models: locating and loading them (local, `models:/` URIs, hub), the safety rules, and the memory plan."""
