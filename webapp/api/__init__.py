"""The HTTP APIs: one folder per protocol (routes, protocol types, one builder each), and what they share."""
