"""Tokens, what upstream authenticates with: app-only tokens (client credentials), delegated
sign-in refreshed from encrypted token files, and the app credentials (secret, certificate,
assertion file)."""
