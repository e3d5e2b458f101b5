"""The status page's script and style sheet, served as same-origin files (relay/web.py)."""
