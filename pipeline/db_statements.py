"""Database statement templates: a span's query text with its values taken out.

A client span's ``db.query.text`` (``db.statement`` in older semantic conventions) holds
the values the query ran with: ids, names, timestamps, lists of keys. Counted per raw
text, every distinct value is a new series, so the counts never group and the number of
series has no bound. ``normalize`` replaces the values with ``?`` and keeps everything
else as written, so queries that differ only in their values count as one statement per
(service, db system), as the Collector, Datadog and Sentry group queries.

It is one scan with one compiled pattern. The quantifiers are possessive, so nothing
backtracks more than a few characters and the time is linear in the text. The scan stops
once the template is longer than the bound, so a huge statement costs little more than a
short one unless it starts with one huge literal, comment or list (a megabyte of one of
those takes a few milliseconds, 30 at most for a string of nothing but escapes). SQL
first:

- ``'...'`` strings (``''`` and backslash escapes; ``E``, ``N``, ``B``, ``X`` prefixes),
  ``$$...$$`` / ``$tag$...$tag$`` strings, numbers (``17``, ``-5.5e3``, ``.5``, ``0x1F``,
  ``1e10``) and bind parameters (``$1``, ``:name``, ``:1``, ``@p1``, ``?``, ``?1``, ``%s``,
  ``%(name)s``) become ``?``. An unterminated string or comment runs to the end of the
  text. Backslash escapes are MySQL's: in standard SQL ``'C:\\'`` ends the string, here it
  does not, which only matters for a string that ends in a backslash.
- Digits that are part of a word stay (``table1``, ``t2.col3``, ``1abc``), and so does a
  double-quoted or backquoted identifier, whatever is in it. ``::int`` casts and
  ``@@system`` variables are not parameters.
- A sign goes with its number at the start or after an operator, comma or parenthesis
  (``x > -5`` -> ``x > ?``); anywhere else it is the binary operator (``x - 5`` ->
  ``x - ?``, ``SELECT -1`` -> ``SELECT -?``).
- ``true``, ``false`` and ``null`` (any case) become ``?`` right after ``=``, ``<``,
  ``>``, ``,`` or ``(``, which covers comparisons and argument and value lists, and inside
  ``IN``/``VALUES`` lists. Elsewhere they stay, so ``IS NULL``, ``IS NOT TRUE`` and
  ``THEN NULL`` keep their words.
- ``IN (...)`` holding only values becomes ``IN (?)`` whatever its length, and
  ``VALUES (...), (...)`` whose rows hold only values becomes ``VALUES (?)``; the keyword
  is kept as written, followed by `` (?)``. Signs, ``+``, ``-``, commas and comments may
  sit between the values (``(1 - 2)`` counts as values). A list with anything else in it
  (a column, ``now()``, a subquery) keeps its shape with its values as ``?``, and so does
  ``()``.
- ``-- ...`` and ``/* ... */`` comments go (not MySQL's ``#``: that is an operator in
  Postgres). Each run of whitespace and comments becomes one space, and the ends are
  trimmed; no space is added, so ``x=1`` and ``x = 1`` stay two templates. Keywords keep
  their case.
- The template is at most ``max_chars`` long: a longer one is cut to ``max_chars - 1``
  characters and ends in ``…``.

Other query languages go through the same rules. In a Redis command a number standing
alone or after punctuation goes and a word keeps its digits (``GET user:1234`` ->
``GET user:?``, ``HGET user1 name`` unchanged), so a key holding an id glued to letters
(``session:9f3ab2``) stays as it is. A Mongo command in JSON loses its numbers and keeps
its double-quoted strings, keys and values both (``{"age": 30}`` -> ``{"age": ?}``).
"""

from __future__ import annotations

import re

MAX_STATEMENT_CHARS = 200

# An unterminated /* comment, string, dollar string or quoted identifier runs to the end of the text.
_COMMENT = r"--[^\n]*+|/\*(?:[^*]++|\*++(?!/))*+(?:\*++/?)?"
_SEP = rf"(?:\s++|{_COMMENT})*+"
_STR_BODY = r"[^'\\]*+(?:(?:''|\\[\s\S]?)[^'\\]*+)*+'?"
_STR = rf"[eEnNbBxX]?'{_STR_BODY}"
_DOLLAR = r"\$(?P<{0}>(?:[A-Za-z_]\w*+)?)\$(?:[^$]++|\$(?!(?P={0})\$))*+(?:\$(?P={0})\$)?"
_NUM = r"(?:0[xX][0-9a-fA-F]++|0[bB][01]++|(?:\d++(?:\.\d*+)?|(?<![\w$])\.\d++)(?:[eE][-+]?\d++)?)(?![\w$])"
_BIND = r"\$\d++|\?\d*+|:(?<![:\w?]:)(?:[A-Za-z_]\w*+|\d++)|@(?<![@\w?]@)[A-Za-z_]\w*+|%(?:\(\w++\))?s"

# A parenthesized list of values, read in runs rather than item by item, so a list of a
# million numbers is one pass of a character class. It takes what the tokens below make
# ``?`` of, with signs, commas and comments between; every alternative starts with a
# character or a class, which the engine checks before trying it. Loose on purpose:
# ``(1 - 2)`` or ``(1 2)`` are values too.
_ROW_BODY = (
    r"(?:[0-9 \t\r\n\f\v,.+]++|-(?!-)|'{str}|[eEnNbBxX]'{str}|{dollar}|\$[0-9]++|\?[0-9]*+"
    r"|:(?<![:\w?]:)(?:[A-Za-z_]\w*+|[0-9]++)|@(?<![@\w?]@)[A-Za-z_]\w*+|%(?:\(\w++\))?s|{comment}"
    r"|[eE](?<=[0-9.][eE])[-+]?[0-9]++|[xX](?<=0[xX])[0-9a-fA-F]++|[bB](?<=0[bB])[01]++"
    r"|(?ai:true|false|null)(?![\w$]))*+"
)


def _row(tag: str) -> str:
    return r"\(" + _row_rest(tag)


def _row_rest(tag: str) -> str:
    """A row after its opening parenthesis."""
    body = _ROW_BODY.format(str=_STR_BODY, dollar=_DOLLAR.format(tag), comment=_COMMENT)
    return rf"(?!\s*+\)){body}\)"


_TOKEN = re.compile(
    rf"""
    (?P<skip>(?:\s++|{_COMMENT})++)
  | (?P<inlist>(?ai:in){_SEP}{_row("t1")})
  | (?P<values>(?ai:values){_SEP}{_row("t2")}(?:{_SEP},{_SEP}{_row("t3")})*+(?!{_SEP},))
  | (?P<str>{_STR})
  | (?P<dollar>{_DOLLAR.format("t4")})
  | (?P<ident>"[^"]*+(?:""[^"]*+)*+"?|`[^`]*+(?:``[^`]*+)*+`?)
  | (?P<bind>(?:{_BIND})(?![\w$]))
  | (?P<num>{_NUM})
  | (?P<snum>[-+]\s*+{_NUM})
  | (?P<word>\w[\w$]*+)
  | (?P<other>[\s\S])
    """,
    re.VERBOSE,
)
_VALUE = frozenset({"str", "dollar", "bind", "num"})
_UNARY_AFTER = frozenset("=<>!,(+-*/%|&^~[")  # a sign after these (or first) belongs to its number
_LITERAL_AFTER = frozenset("=<>,(")  # true/false/null after these are values
_LITERAL_WORDS = frozenset({"true", "false", "null"})


# The fast path, for a text that _FAST_TEXT accepts: plain words, numbers, whitespace,
# operators and punctuation; '...' strings without backslashes or parentheses that follow
# no word character (so no E'...' prefixes); "..." and `...` identifiers holding one plain
# word; $ only inside a word or as $1; no comments, dollar strings or non-ASCII outside
# strings. Whitespace there is only between tokens or inside strings, so it is collapsed
# first, and then a token the scanner reads starts after a character that is neither a
# word character nor $, and the last character the scanner has written before it is the
# one before it in the text, or the ? of a value ending there, so fixed-width lookbehinds
# decide what the scanner decides. _FAST_LIST finds the lists by their parenthesis and
# the keyword behind it (not a bind's name), with the scanner's own pattern for the rest;
# _FAST_VALUE puts ? for each value left, a sign going with its number where the scanner's
# rule says so; _FAST_LITERAL does true/false/null. Each pattern starts with one character
# class, which the engine looks for before trying the rest.
_FAST_MAX_CHARS = 4096
_FAST_TEXT = re.compile(
    r"""(?:
        [A-Za-z0-9_ \t\n\r\f\v(),;=<>!*+%&|^~\[\]{}\#?:@]++
      | \.(?![0-9])
      | (?<=[A-Za-z0-9_$])\.
      | -(?!-)
      | /(?!\*)
      | (?<![\w$])'[^'\\(]*+(?:''[^'\\(]*+)*+(?:'|\Z)
      | "\$?[A-Za-z_][A-Za-z0-9_$]*+"
      | `\$?[A-Za-z_][A-Za-z0-9_$]*+`
      | (?<=[A-Za-z0-9_])\$
      | \$[0-9]++(?![\w$])
    )*+""",
    re.VERBOSE,
)


def _after_keyword(keyword: str) -> str:
    """The parenthesis just read follows ``keyword`` and one blank or none, and the keyword
    starts a token: no word character or $ before it, and it is not the name of a bind."""
    return "|".join(
        rf"(?<={keyword}{sep}\()(?<![\w$]{keyword}{sep}\()(?<![^:\w?]:{keyword}{sep}\()(?<!^:{keyword}{sep}\()"
        rf"(?<![^@\w?]@{keyword}{sep}\()(?<!^@{keyword}{sep}\()"
        for sep in ("", "[ ]")
    )


_FAST_LIST = re.compile(
    rf"""\((?:
        (?:{_after_keyword("[iI][nN]")}){_row_rest("t1")}
      | (?:{_after_keyword("[vV][aA][lL][uU][eE][sS]")}){_row_rest("t2")}(?:{_SEP},{_SEP}{_row("t3")})*+(?!{_SEP},)
    )""",
    re.VERBOSE,
)
_FAST_VALUE = re.compile(
    rf"""[-+'0-9?$:@%](?:
        (?<=[0-9])(?<![\w$][0-9])
        (?:[0-9]*+(?:\.[0-9]*+)?(?:[eE][-+]?[0-9]++)?|(?<=0)[xX][0-9a-fA-F]++|(?<=0)[bB][01]++)(?![\w$])
      | (?<=')[^'\\]*+(?:''[^'\\]*+)*+'?
      | (?<=[-+?$:@%])(?:
            (?<=\?)[0-9]*+(?![\w$])
          | (?<=[-+])(?:(?<=[-=<>!,(+*/%|&^~\[][-+])|(?<=[-=<>!,(+*/%|&^~\[][ ][-+])|(?<![\s\S][-+]))[ ]?{_NUM}
          | (?<=\$)(?<![\w$]\$)[0-9]++(?![\w$])
          | (?<=:)(?<![:\w?]:)(?:[A-Za-z_]\w*+|[0-9]++)(?![\w$])
          | (?<=@)(?<![@\w?]@)[A-Za-z_]\w*+(?![\w$])
          | (?<=%)(?:\(\w++\))?s(?![\w$])
        )
    )""",
    re.VERBOSE,
)


_FAST_LITERAL = re.compile(r"([=<>,(] ?)(?ai:true|false|null)(?![\w$])")


def _literal_piece(m: re.Match[str]) -> str:
    return m.group(1) + "?"


def _list_piece(m: re.Match[str]) -> str:
    return "(?)" if m.string[m.start() - 1] == " " else " (?)"


def normalize(text: str, max_chars: int = MAX_STATEMENT_CHARS) -> str:
    """The template of a query text: values as ``?``, comments gone, whitespace collapsed,
    at most ``max_chars`` characters (a longer template is cut and ends in ``…``).

    A plain statement (see ``_FAST_TEXT``) takes a fast path of a few substitutions, with
    the same result as the scanner, ``_normalize_full``, which takes every other text."""
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    if len(text) > _FAST_MAX_CHARS or _FAST_TEXT.fullmatch(text) is None:
        return _normalize_full(text, max_chars)
    result = " ".join(text.split())
    if "(" in result:
        result = _FAST_LIST.sub(_list_piece, result)
    result = _FAST_VALUE.sub("?", result)
    low = result.lower()
    if "true" in low or "false" in low or "null" in low:
        result = _FAST_LITERAL.sub(_literal_piece, result)
    if len(result) > max_chars:
        return result[: max_chars - 1] + "…"
    return result


def _normalize_full(text: str, max_chars: int = MAX_STATEMENT_CHARS) -> str:
    """``normalize`` by the scanner, for any text."""
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    out: list[str] = []
    size = 0
    last = ""  # the last character written
    gap = False  # whitespace or a comment since then
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "skip":
            gap = True
            continue
        tok = m.group()
        if kind in _VALUE:
            piece = "?"
        elif kind == "inlist":
            piece = tok[:2] + " (?)"
        elif kind == "values":
            piece = tok[:6] + " (?)"
        elif kind == "snum":
            if not last or last in _UNARY_AFTER:
                piece = "?"
            else:
                piece = tok[0] + (" ?" if tok[1].isspace() else "?")
        elif kind == "word" and len(tok) <= 5 and last in _LITERAL_AFTER and tok.lower() in _LITERAL_WORDS:
            piece = "?"
        else:
            piece = tok
        if gap and out:
            out.append(" ")
            size += 1
        gap = False
        out.append(piece)
        size += len(piece)
        last = piece[-1]
        if size > max_chars:  # what follows cannot change the first max_chars characters
            break
    result = "".join(out)
    if len(result) > max_chars:
        return result[: max_chars - 1] + "…"
    return result
