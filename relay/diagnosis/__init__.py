"""Diagnosis: the exceptions that decide retry vs bounce, and the explanations that turn an
upstream reply, an Entra error or a network failure into advice naming the setting to change."""
