"""Configuration: the typed schema (`schema`) and its YAML/override loader (`io`)."""
