"""Draft models (EAGLE-3, ConFu) and their reduced vocabulary; they receive target tensors, never the target."""
