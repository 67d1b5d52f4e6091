"""The algorithm: pure functions and small classes importing only numpy/torch (no Ray)."""
