"""Statement templates (pipeline/db_statements.py): values out, everything else as written.

The examples pin the rules; the properties check that ``normalize`` takes any text, keeps
to its bound, gives the same template whatever the values, and is a fixed point of itself.
The fast path is checked against the scanner (``_normalize_full``) on the examples, on
SQL-like text from a grammar of the constructs either one treats specially, and on any text.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.db_statements import _FAST_TEXT, MAX_STATEMENT_CHARS, _normalize_full, normalize

EXAMPLES = [
    ("SELECT * FROM items WHERE order_id = 17", "SELECT * FROM items WHERE order_id = ?"),
    ("SELECT * FROM items WHERE order_id = 123456", "SELECT * FROM items WHERE order_id = ?"),
    ("select name from users where id in (1, 2, 3) and kind = 'a''b'",
     "select name from users where id in (?) and kind = ?"),
    ("INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y')", "INSERT INTO t (a, b) VALUES (?)"),
    ("SELECT * FROM t1 JOIN t2 ON t1.id = t2.id WHERE t1.x > -5.5e3",
     "SELECT * FROM t1 JOIN t2 ON t1.id = t2.id WHERE t1.x > ?"),
    ("SELECT a FROM b WHERE c = $1 AND d = :name AND e = @p2", "SELECT a FROM b WHERE c = ? AND d = ? AND e = ?"),
    ("SELECT 1 -- comment\n  FROM   dual /* x */", "SELECT ? FROM dual"),
    ("SELECT addatabase.aditems", "SELECT addatabase.aditems"),
    ("GET user:1234", "GET user:?"),
    ("HGET user1 name", "HGET user1 name"),
    # literals
    ("SELECT 'it''s', 'a\\'b', E'c\\'d', N'e', X'1F', B'01' FROM t", "SELECT ?, ?, ?, ?, ?, ? FROM t"),
    ("SELECT $$it's$$, $fn$ a $$ b $fn$, $1", "SELECT ?, ?, ?"),
    ("SELECT 0x1F, 0b101, 1e10, 2.5E-3, .5, 7.", "SELECT ?, ?, ?, ?, ?, ?"),
    ("WHERE a = 'unterminated", "WHERE a = ?"),
    ("WHERE a = 1 /* unterminated", "WHERE a = ?"),
    # identifiers and what is not a parameter
    ('SELECT "col 1", "t""2", `x 3` FROM "My Table1"', 'SELECT "col 1", "t""2", `x 3` FROM "My Table1"'),
    ("SELECT t2.col3, table1.x1, 1abc FROM v$session", "SELECT t2.col3, table1.x1, 1abc FROM v$session"),
    ("SELECT x::int, @@version, a:=b", "SELECT x::int, @@version, a:=b"),
    ("WHERE a = ? AND b = ?2 AND c = %s AND d = %(name)s AND e = :1",
     "WHERE a = ? AND b = ? AND c = ? AND d = ? AND e = ?"),
    # signs
    ("WHERE x = -1 AND y IN (-2, +3) AND z = a - 1 AND w = b-1", "WHERE x = ? AND y IN (?) AND z = a - ? AND w = b-?"),
    ("SELECT -1", "SELECT -?"),
    ("-1", "?"),
    # true / false / null
    ("UPDATE t SET a = true, b = NULL WHERE c IS NULL AND d IS NOT TRUE",
     "UPDATE t SET a = ?, b = ? WHERE c IS NULL AND d IS NOT TRUE"),
    ("SELECT coalesce(a, null), CASE WHEN b THEN false END", "SELECT coalesce(a, ?), CASE WHEN b THEN false END"),
    ("WHERE flag IN (true, FALSE, null)", "WHERE flag IN (?)"),
    # lists
    ("WHERE id IN ( $1 , $2 , $3 ) AND k in('a','b')", "WHERE id IN (?) AND k in (?)"),
    ("WHERE id NOT IN (1, /* two */ 2,\n 3)", "WHERE id NOT IN (?)"),
    ("WHERE id IN (SELECT id FROM u WHERE n = 5)", "WHERE id IN (SELECT id FROM u WHERE n = ?)"),
    ("WHERE id IN (a, 1)", "WHERE id IN (a, ?)"),
    ("WHERE id IN ()", "WHERE id IN ()"),
    ("INSERT INTO t VALUES (1, now()), (2, now())", "INSERT INTO t VALUES (?, now()), (?, now())"),
    ("INSERT INTO t VALUES (1), (2) ON CONFLICT DO NOTHING", "INSERT INTO t VALUES (?) ON CONFLICT DO NOTHING"),
    ("insert into t values ($1, $2)", "insert into t values (?)"),
    ("SELECT f(1, 2), (3, 4)", "SELECT f(?, ?), (?, ?)"),
    # other languages and odd text
    ('{"find": "users", "filter": {"age": {"$gt": 30}}}', '{"find": "users", "filter": {"age": {"$gt": ?}}}'),
    ("ZRANGE board 0 -1 WITHSCORES", "ZRANGE board ? -? WITHSCORES"),
    ("", ""),
    ("  \n\t ", ""),
    ("-- only a comment", ""),
    ("'", "?"),
    ('"', '"'),
]  # fmt: skip


@pytest.mark.parametrize(("text", "template"), EXAMPLES)
def test_examples(text, template):
    assert normalize(text) == template


@pytest.mark.parametrize(("text", "template"), EXAMPLES)
def test_idempotent(text, template):
    assert normalize(template) == template


def test_bound():
    text = "SELECT " + ", ".join(f"col{i}" for i in range(100)) + " FROM t"
    out = normalize(text)
    assert len(out) == MAX_STATEMENT_CHARS and out.endswith("…")
    assert out[:-1] == text[: MAX_STATEMENT_CHARS - 1]
    assert normalize(text, 10) == "SELECT co…"
    assert normalize("SELECT 1", 8) == "SELECT ?"  # exactly the bound: not cut
    assert normalize("SELECT 1", 1) == "…"
    assert normalize(text, 10_000) == text
    with pytest.raises(ValueError):
        normalize(text, 0)


def test_long_list_collapses_before_the_bound():
    ids = ", ".join(str(i) for i in range(10_000))
    assert normalize(f"SELECT * FROM t WHERE id IN ({ids}) AND a = 'x'") == "SELECT * FROM t WHERE id IN (?) AND a = ?"
    rows = ", ".join(f"({i}, 'name {i}', {i}.5, NULL)" for i in range(10_000))
    assert normalize(f"INSERT INTO t VALUES {rows} RETURNING id") == "INSERT INTO t VALUES (?) RETURNING id"


@pytest.mark.parametrize(
    "text",
    [
        "SELECT * FROM t WHERE id IN (" + ", ".join(str(i) for i in range(150_000)) + ")",
        "INSERT INTO t VALUES " + ", ".join(f"({i}, 'n{i}')" for i in range(60_000)),
        "SELECT '" + "x''" * 300_000 + "'",
        "/*" + "*" * 1_000_000,
        "IN (" + "1," * 500_000,
        "'\\" * 500_000,
        "a = 1 AND " * 100_000,
        "(" * 1_000_000,
        "$a$" * 300_000,
    ],
    ids=["in-list", "values", "string", "comment", "open-list", "escapes", "many-tokens", "parens", "dollars"],
)
def test_megabyte_inputs(text):
    assert len(text) >= 900_000
    assert len(normalize(text)) <= MAX_STATEMENT_CHARS


# ------------------------------------------------------------------ properties

# Pieces that exercise every rule, and arbitrary characters between them.
pieces = st.one_of(
    st.sampled_from([
        "'", "''", "\\", '"', "`", "$", "$$", "$t$", "--", "/*", "*/", "\n", " ", "(", ")", ",", "-", "+", "=",
        ".", ":", "::", "@", "@@", "?", "%s", "%(a)s", "0x1F", "0b1", "1e5", "1.", ".5", "7", "E'", "N'", "in (",
        "IN(", "VALUES (", "), (", "null", "TRUE", "false", "IS ", "select", "t1", "…", "é", "٣",
    ]),
    st.characters(),
)  # fmt: skip
texts = st.one_of(st.text(), st.lists(pieces, max_size=50).map("".join))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, st.integers(1, 300))
def test_any_text(text, max_chars):
    out = normalize(text, max_chars)
    assert isinstance(out, str) and len(out) <= max_chars
    full = normalize(text, 1_000_000)
    assert out == (full if len(full) <= max_chars else full[: max_chars - 1] + "…")  # stopping early changes nothing
    assert normalize(full, 1_000_000) == full


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


numbers = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(0, 2**64).map(hex),
)
values = st.one_of(numbers, st.text().map(sql_string), st.sampled_from(["NULL", "true", "False", "$3", ":id", "?"]))
TEMPLATES = [
    "SELECT * FROM orders WHERE id = {} AND status = {}",
    "select name from users where id in ({}) and kind <> {}",
    "INSERT INTO t1 (a, b) VALUES ({}, {}), ({}, {})",
    "UPDATE items SET price = {}, note = {} WHERE sku = 'x'",
    "SELECT coalesce(a, {}) FROM t WHERE b >= {} -- {}",
]
slots = st.lists(st.lists(values, min_size=1, max_size=5), min_size=4, max_size=4)


def fill(template: str, slots: list[list[str]]) -> str:
    """The ``in ({})`` slot takes its whole list; any other slot its first value."""
    return template.format(*(", ".join(vs) if i == 0 and " in (" in template else vs[0] for i, vs in enumerate(slots)))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(TEMPLATES), slots, slots)
def test_values_do_not_change_the_template(template, first, second):
    assume("\n" not in first[2][0] + second[2][0])  # a line break in the -- comment's slot ends the comment
    out = normalize(fill(template, first))
    assert out == normalize(fill(template, second))
    assert "?" in out and out == normalize(template.format(*["1"] * 4))


# ------------------------------------------------- the fast path against the scanner

# Typical ORM and hand-written statements: each must take the fast path, or the daemon
# pays the scanner for it.
PLAIN = [
    "SELECT * FROM items WHERE order_id = 12345 AND status = 'open'",
    "SELECT users.id, users.name FROM users WHERE users.id = $1 LIMIT 1",
    'SELECT "app_user"."id", "app_user"."email" FROM "app_user" WHERE "app_user"."id" = 42',
    "SELECT `users`.* FROM `users` WHERE `users`.`id` = 7 LIMIT 1",
    "INSERT INTO orders (id, customer_id, total, note) VALUES (987654, 42, 19.99, 'gift')",
    "INSERT INTO t (a, b) VALUES (%s, %s), (%s, %s)",
    "UPDATE accounts SET balance = balance - 10.5, updated_at = '2024-01-01 10:00:00' WHERE id = :id",
    "DELETE FROM sessions WHERE user_id = @p1 AND expires_at < ?",
    "SELECT * FROM products WHERE id IN (1, 2, 3) AND active = true AND deleted_at IS NULL",
    "select count(*) from t where x > -5 and y <> 'it''s' order by z desc offset 10",
    "SELECT *\n  FROM t\n WHERE a = %(name)s\n   AND b::int >= 0x1F",
    "GET user:1234",
]


@pytest.mark.parametrize("text", PLAIN)
def test_typical_statements_take_the_fast_path(text):
    assert _FAST_TEXT.fullmatch(text)
    assert normalize(text) == _normalize_full(text)


@pytest.mark.parametrize("text", [t for pair in EXAMPLES for t in pair] + PLAIN)
def test_fast_path_matches_the_scanner_on_the_examples(text):
    for max_chars in (1, 5, 20, MAX_STATEMENT_CHARS):
        assert normalize(text, max_chars) == _normalize_full(text, max_chars)


def either_case(word: str) -> st.SearchStrategy[str]:
    return st.sampled_from([word, word.upper(), word.capitalize()])


KEYWORDS = [
    "select", "from", "where", "and", "or", "not", "in", "values", "insert into", "update", "set", "delete",
    "is", "null", "true", "false", "limit", "offset", "order by", "join", "on", "as", "case", "when", "then",
    "end", "like", "between", "exists", "returning", "e", "n", "b", "x", "in_stock", "valuesx", "tin", "nulls",
]  # fmt: skip
name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_$]{0,6}", fullmatch=True)
identifiers = st.one_of(
    name,
    st.from_regex(r"[A-Za-z_0-9$]{1,5}", fullmatch=True),  # 1abc, t2, v$session, $x
    st.builds("{}.{}".format, name, name),
    st.builds('"{}"'.format, st.one_of(name, st.text(max_size=6))),
    st.builds("`{}`".format, st.one_of(name, st.text(max_size=6))),
)
sql_numbers = st.one_of(
    st.integers(0, 10**12).map(str),
    st.from_regex(r"[0-9]{0,3}\.[0-9]{0,3}([eE][-+]?[0-9]{1,3})?", fullmatch=True),
    st.from_regex(r"[0-9]{1,3}[eE][-+]?[0-9]{0,3}", fullmatch=True),
    st.from_regex(r"0[xXbB][0-9a-fA-FgG]{0,4}", fullmatch=True),
    st.builds("{}{}{}".format, st.sampled_from(["-", "+"]), st.sampled_from(["", " ", "  ", "\n"]),
              st.integers(0, 999).map(str)),
)  # fmt: skip
string_body = st.lists(st.sampled_from([*"ab1 (),-/*$\\'\"\né", "''", "\\'", " in (", "--"]), max_size=6).map("".join)
sql_strings = st.builds(
    "{}'{}{}".format,
    st.sampled_from(["", "", "", "E", "n", "B", "X", "a"]),
    string_body,
    st.sampled_from(["'", "'", ""]),
)
binds = st.sampled_from(["$1", "$23", "?", "?2", ":name", ":1", "@p1", "@@version", "%s", "%(name)s", "%d", "::int",
                         "a:=b", "$$", "$t$x$t$", "$a$"])  # fmt: skip
comments = st.sampled_from(["-- note\n", "--", "/* c */", "/*", "/* a*/", "#"])
operators = st.sampled_from(list("=<>!+-*/%|&^~[](),.;:@?#{}") + ["<>", "!=", "<=", ">=", "||", "::", "- -"])
literal = st.one_of(sql_numbers, sql_strings, binds, either_case("true"), either_case("false"), either_case("null"))
value_list = st.builds(
    "{}{}({}){}".format,
    st.one_of(either_case("in"), either_case("values"), either_case("not in")),
    st.sampled_from(["", " ", "  ", "\n", "/* x */"]),
    st.lists(literal, max_size=5).flatmap(
        lambda items: st.sampled_from([",", ", ", " ,", " , ", " "]).map(lambda sep: sep.join(items))
    ),
    st.sampled_from(["", ", (1, 2)", ",(3)", ", (x)", " , ("]),
)
sql_token = st.one_of(
    st.sampled_from(KEYWORDS).flatmap(either_case),
    identifiers,
    literal,
    literal,
    comments,
    operators,
    operators,
    value_list,
)
blanks = st.sampled_from(["", " ", " ", " ", "  ", "\n", "\t", " \n "])
sql_texts = st.lists(st.tuples(sql_token, blanks), max_size=25).map(lambda ts: "".join(t + b for t, b in ts))

# The same without what sends a text to the scanner (comments, backslashes, parentheses in
# strings, prefixes, $$), so that most texts take the fast path.
plain_literal = st.one_of(
    sql_numbers,
    st.builds("'{}'".format, st.text(st.sampled_from([*"ab1 ,-*$\"\né%:?@"]), max_size=6)),
    st.sampled_from(["$1", "$23", "?", "?2", ":name", ":1", "@p1", "@@version", "%s", "%(name)s", "%(true)s", "::int"]),
    either_case("true"), either_case("false"), either_case("null"),
)  # fmt: skip
plain_token = st.one_of(
    st.sampled_from(KEYWORDS).flatmap(either_case),
    name,
    st.builds("{}.{}".format, name, name),
    st.builds('"{}"'.format, name),
    st.builds("`{}`".format, name),
    plain_literal, plain_literal,
    st.sampled_from(list("=<>!+-*/%|&^~[](),.;:@?#{}") + ["<>", "!=", "<=", ">=", "||", "::", "- -"]),
    st.builds(
        "{}{}({}){}".format,
        st.one_of(either_case("in"), either_case("values")),
        st.sampled_from(["", " ", "  ", "\n"]),
        st.lists(plain_literal, max_size=4).flatmap(
            lambda items: st.sampled_from([",", ", ", " ,", " "]).map(lambda sep: sep.join(items))
        ),
        st.sampled_from(["", ", (1, 2)", ",(3)", ", (x)", " ,"]),
    ),
)  # fmt: skip
plain_sql_texts = st.lists(st.tuples(plain_token, blanks), max_size=25).map(lambda ts: "".join(t + b for t, b in ts))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(sql_texts, plain_sql_texts), st.sampled_from([MAX_STATEMENT_CHARS, MAX_STATEMENT_CHARS, 30, 1]))
def test_fast_path_matches_the_scanner_on_sql(text, max_chars):
    assert normalize(text, max_chars) == _normalize_full(text, max_chars)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(texts, st.lists(st.one_of(sql_token, pieces, blanks), max_size=30).map("".join)))
def test_fast_path_matches_the_scanner_on_any_text(text):
    assert normalize(text) == _normalize_full(text)
