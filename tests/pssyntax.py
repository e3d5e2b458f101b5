"""Checking the generated PowerShell without PowerShell.

`pwsh` is not in Debian's archive (`apt-cache policy powershell` finds nothing), so CI cannot run
the script or use PowerShell's own parser. Two checks stand in: ``grammar_errors`` parses it with
tree-sitter's PowerShell grammar (a real grammar, from PyPI; more lenient than PowerShell in
places, e.g. ``try`` without ``catch``), and ``problems`` checks what a template edit most often
breaks: brackets, braces and parentheses balanced and matched, quotes, here-strings and block
comments closed, and no space after a line-continuation backtick (which silently ends the
command there).
"""

from __future__ import annotations

import os
import re

import pytest


def grammar_errors(text: str) -> list[str]:
    """ERROR and MISSING nodes of tree-sitter's PowerShell parse, as "line N: source"."""
    try:
        import tree_sitter_powershell
        from tree_sitter import Language, Parser
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("tree-sitter-powershell is not installed (pip install -e '.[dev]')")
    source = text.encode("utf-8")
    tree = Parser(Language(tree_sitter_powershell.language())).parse(source)
    out, todo = [], [tree.root_node]
    while todo:
        node = todo.pop()
        if node.type == "ERROR" or node.is_missing:
            snippet = source[node.start_byte:node.end_byte][:60].decode(errors="replace")
            out.append(f"line {node.start_point[0] + 1}: {node.type} {snippet!r}")
        todo.extend(node.children)
    return out

_PAIRS = {")": "(", "}": "{", "]": "["}


def _skip_single(text: str, i: int) -> int:
    """Index after the single-quoted string starting at ``i`` ('' is an escaped quote)."""
    j = i + 1
    while True:
        k = text.find("'", j)
        if k < 0:
            return -1
        if text.startswith("''", k):
            j = k + 2
            continue
        return k + 1


def _skip_double(text: str, i: int) -> int:
    """Index after the double-quoted string at ``i``: backtick escapes, "" and $( ... )."""
    j, depth = i + 1, 0
    while j < len(text):
        c = text[j]
        if c == "`":
            j += 2
            continue
        if depth == 0 and c == '"':
            if text.startswith('""', j):
                j += 2
                continue
            return j + 1
        if text.startswith("$(", j):
            depth += 1
            j += 2
            continue
        if depth and c == "(":
            depth += 1
        elif depth and c == ")":
            depth -= 1
        elif depth and c == "'":
            j = _skip_single(text, j)
            if j < 0:
                return -1
            continue
        j += 1
    return -1


def problems(text: str) -> list[str]:
    text = text.replace("\r\n", "\n")
    out: list[str] = []
    stack: list[tuple[str, int]] = []
    i, n = 0, len(text)

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    while i < n:
        c = text[i]
        if text.startswith("<#", i):
            end = text.find("#>", i + 2)
            if end < 0:
                out.append(f"line {line_of(i)}: block comment <# is never closed")
                break
            i = end + 2
            continue
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if text.startswith(("@'", '@"'), i):
            quote = text[i + 1]
            if text[i + 2:text.find("\n", i)].strip():
                out.append(f"line {line_of(i)}: a here-string opener must end its line")
            found = re.compile(rf"^{re.escape(quote)}@", re.MULTILINE).search(text, i + 2)
            if found is None:
                out.append(f"line {line_of(i)}: here-string @{quote} is never closed")
                break
            i = found.end()
            continue
        if c in "'\"":
            end = _skip_single(text, i) if c == "'" else _skip_double(text, i)
            if end < 0:
                out.append(f"line {line_of(i)}: string {c} is never closed")
                break
            i = end
            continue
        if c == "`":
            rest = text[i + 1:text.find("\n", i) if "\n" in text[i:] else n]
            if rest and not rest.strip():
                out.append(f"line {line_of(i)}: space after a line-continuation backtick")
            i += 2
            continue
        if c in "({[":
            stack.append((c, i))
        elif c in ")}]":
            if not stack or stack[-1][0] != _PAIRS[c]:
                opened = (f"{stack[-1][0]} of line {line_of(stack[-1][1])}" if stack
                          else "anything")
                out.append(f"line {line_of(i)}: {c} does not close {opened}")
                break
            stack.pop()
        i += 1
    out += [f"line {line_of(pos)}: {opener} is never closed" for opener, pos in stack]
    return out
