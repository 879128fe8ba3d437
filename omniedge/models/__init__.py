"""Model-family facts: configs of the real, tiny and reference models, and version-proof module lookup."""
