"""The manifest of weights shipped with brainbag (data only; see README.md and manifest.json)."""
