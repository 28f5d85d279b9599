"""The editors — the math of each method, no Lightning — and what they share (docs/design.md, "Layers")."""
