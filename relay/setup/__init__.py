"""``m365relay init``: from nothing to a checked config and the Microsoft 365 setup scripts.

An operator tool on top of the relay. It writes an app certificate, a commented config that
``check-config`` accepts, and two idempotent setup scripts for the admin (Microsoft Graph
PowerShell + Exchange Online PowerShell, or ``az`` + Exchange Online PowerShell). Re-running it on
an existing config adds mailboxes, devices or the app's client id without losing anything.

It imports from the relay only the config loader (to check what it wrote) and the password
hasher, so it can move with the layout.
"""
