"""The m365relay benchmark (issue 6): direct vs m365relay vs emailproxy on the sandbox fakes.

See bench/README.md. Run with ``bench/run`` or ``.venv/bin/python -m bench``.
"""
