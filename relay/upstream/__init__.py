"""Upstream transports: one authenticated connection to Exchange Online per mailbox, over SMTP
(STARTTLS + XOAUTH2) or Microsoft Graph ``sendMail``."""
