"""Configuration, the bottom layer: YAML (or ``M365RELAY_*`` variables) parsed once into frozen,
typed records checked with key-path errors, plus per-cloud endpoints and secret-file modes.

Everything else reads these records; nothing here imports another stage."""
