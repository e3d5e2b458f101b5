"""m365relay: plain SMTP in, Exchange Online over OAuth 2.0 out."""

__version__ = "0.1.0"
