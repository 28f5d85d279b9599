"""Editors (ROME, MEMIT, PMET) and the math they share (keys, z optimisation, updates, C)."""
