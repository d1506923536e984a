"""Database statement templates: a span's query text with its values taken out.

A client span's ``db.query.text`` (``db.statement`` in older semantic conventions) holds
the values the query ran with: ids, names, timestamps, lists of keys. Counted per raw
text, every distinct value is a new series, so the counts never group and the number of
series has no bound. ``normalize`` replaces the values with ``?`` and keeps everything
else as written, so queries that differ only in their values count as one statement per
(service, db system), as the Collector, Datadog and Sentry group queries.

The rules are those of one scan with one compiled pattern (``_normalize_full``). The
quantifiers are possessive, so nothing backtracks more than a few characters and the time
is linear in the text. The scan stops once the template is longer than the bound, so a
huge statement costs little more than a short one unless it starts with one huge literal,
comment or list (a megabyte of one of those takes a few milliseconds, 30 at most for a
string of nothing but escapes). The scan takes 10 to 20 µs for a typical statement, so
most statements take a fast path instead, with the same result (the tests compare the two
on any text): a text of at most four times the bound, with no comments, backslashes,
prefixed or ``$$`` strings, parentheses in strings, non-ASCII outside strings or quoted
identifiers holding more than one plain word, has its whitespace collapsed and then its
lists and its values replaced by a few substitutions, in 1 to 3 µs. SQL first:

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
    body = _ROW_BODY.format(str=_STR_BODY, dollar=_DOLLAR.format(tag), comment=_COMMENT)
    return rf"\((?!\s*+\)){body}\)"


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


# The fast path. _FAST_TEXT accepts a text of plain words, numbers, operators and
# punctuation; '...' strings without backslashes or parentheses and after no word
# character (so no E'...' prefixes); "..." and `...` identifiers holding one plain word;
# $ inside a word or as $1, never opening a $$ or $tag$ string; no comments, and nothing
# but ASCII outside the strings. Whitespace there is only between tokens or inside
# strings, so it is collapsed first. After that, every token the scanner reads starts
# after a character that is neither a word character nor $, and the last character the
# scanner has written before it is the one before it in the text (or the ? of a value
# that ends there), so fixed-width lookbehinds decide what the scanner decides:
# _FAST_LIST takes the lists, by their parenthesis and the keyword before it (starting a
# token, so not the name of a :name or @name bind), read with the scanner's row pattern
# less what cannot occur here; _FAST_VALUE then takes the values: literals, numbers,
# binds, a sign with its number where the scanner's rule says so, true/false/null after
# = < > , or (. Each alternative of _FAST_VALUE starts with one character of its own, so
# the engine skips to the characters that can start one and tries only that one.
_FAST_TEXT = re.compile(
    r"""(?:
        [A-Za-z0-9_ \t\n\r\f\v(),.;=<>!*+%&|^~\[\]{}\#?:@]++
      | "\$?[A-Za-z_][A-Za-z0-9_$]*+"
      | '(?<![\w$]')[^'\\(]*+(?:''[^'\\(]*+)*+(?:'|\Z)
      | -(?!-)
      | /(?!\*)
      | `\$?[A-Za-z_][A-Za-z0-9_$]*+`
      | \$(?![A-Za-z_]\w*+\$|\$)(?:(?<=[A-Za-z0-9_]\$)|[0-9]++(?![\w$]))
    )*+""",
    re.VERBOSE,
)


def _either_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" for c in word)


# _row without comments, $$ strings, prefixed strings and backslashes, after the parenthesis
_FAST_ROW_REST = r"(?!\s*+\))(?:{})*+\)".format("|".join([
    r"[0-9 \t\r\n\f\v,.+][0-9 \t\r\n\f\v,.+]*+", r"-(?!-)", r"'[^'\\]*+(?:''[^'\\]*+)*+'?", r"\?[0-9]*+",
    r"\$[0-9]++", r":(?<![:\w?]:)(?:[A-Za-z_]\w*+|[0-9]++)", r"@(?<![@\w?]@)[A-Za-z_]\w*+", r"%(?:\(\w++\))?s",
    r"[eE](?<=[0-9.][eE])[-+]?[0-9]++", r"[xX](?<=0[xX])[0-9a-fA-F]++", r"[bB](?<=0[bB])[01]++",
    *(rf"{_either_case(word)}(?![\w$])" for word in ("true", "false", "null")),
]))  # fmt: skip


def _fast_list(blank: str) -> re.Pattern[str]:
    """IN and VALUES lists whose keyword is followed by ``blank``, from the parenthesis."""

    def after(keyword: str) -> str:
        return (
            rf"(?<={keyword}{blank}\()(?<![\w$]{keyword}{blank}\()(?<![^:\w?]:{keyword}{blank}\()"
            rf"(?<!^:{keyword}{blank}\()(?<![^@\w?]@{keyword}{blank}\()(?<!^@{keyword}{blank}\()"
        )

    in_list = after(_either_case("in")) + _FAST_ROW_REST
    values = rf"{after(_either_case('values'))}{_FAST_ROW_REST}(?:\s*+,\s*+\({_FAST_ROW_REST})*+(?!\s*+,)"
    return re.compile(rf"\((?<=[nNsS]{blank}\()(?:{in_list}|{values})")


_FAST_LIST = _fast_list(" ")  # the rule
_FAST_LIST_TIGHT = _fast_list("")  # in(1, 2)
_FAST_DECIMAL = r"[0-9]*+(?:\.[0-9]*+)?(?:[eE][-+]?[0-9]++)?(?![\w$])"
_FAST_SIGN_AFTER = r"[-=<>!,(+*/%|&^~\[]"  # _UNARY_AFTER
_FAST_VALUE = re.compile(
    "|".join([
        r"'[^'\\]*+(?:''[^'\\]*+)*+'?",
        rf"0(?<![\w$]0)(?:[xX][0-9a-fA-F]++(?![\w$])|[bB][01]++(?![\w$])|{_FAST_DECIMAL})",
        *(rf"{d}(?<![\w$]{d}){_FAST_DECIMAL}" for d in "123456789"),
        r"\.(?<![\w$]\.)[0-9]++(?:[eE][-+]?[0-9]++)?(?![\w$])",
        r"\?[0-9]*+(?![\w$])",
        r"\$(?<![\w$]\$)[0-9]++(?![\w$])",
        r":(?<![:\w?]:)(?:[A-Za-z_]\w*+|[0-9]++)(?![\w$])",
        r"@(?<![@\w?]@)[A-Za-z_]\w*+(?![\w$])",
        r"%(?:\(\w++\))?s(?![\w$])",
        *(  # a sign first or after _FAST_SIGN_AFTER, with its number
            rf"{c}(?:(?<={_FAST_SIGN_AFTER}{c})|(?<={_FAST_SIGN_AFTER}[ ]{c})|(?<![\s\S]{c}))[ ]?{_NUM}"
            for c in ("-", r"\+")
        ),
        *(  # true/false/null after _LITERAL_AFTER
            rf"{c}(?<=[=<>,( ]{c})(?:(?<=[=<>,(]{c})|(?<=[=<>,(][ ]{c})){_either_case(word[1:])}(?![\w$])"
            for word in ("true", "false", "null")
            for c in (word[0], word[0].upper())
        ),
    ])
)  # fmt: skip


def normalize(text: str, max_chars: int = MAX_STATEMENT_CHARS) -> str:
    """The template of a query text: values as ``?``, comments gone, whitespace collapsed,
    at most ``max_chars`` characters (a longer template is cut and ends in ``…``).

    A plain statement (``_FAST_TEXT``) no longer than ``4 * max_chars`` takes the fast
    path, a few substitutions, and gets the same template as from the scanner,
    ``_normalize_full``, which takes every other text."""
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    if len(text) > 4 * max_chars or _FAST_TEXT.fullmatch(text) is None:  # the scanner stops at the bound
        return _normalize_full(text, max_chars)
    result = " ".join(text.split())
    if "(" in result:
        result = _FAST_LIST.sub("(?)", result)
        if "n(" in result or "N(" in result or "s(" in result or "S(" in result:
            result = _FAST_LIST_TIGHT.sub(" (?)", result)
    result = _FAST_VALUE.sub("?", result)
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
