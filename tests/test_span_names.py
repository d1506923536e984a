"""Span names with ids folded into templates (pipeline/span_names.py)."""

from __future__ import annotations

import pytest

from pipeline.span_names import template


@pytest.mark.parametrize(
    "name, want",
    [
        ("GET /users/123", "GET /users/{id}"),
        ("GET /users/123/orders/7", "GET /users/{id}/orders/{id}"),
        ("/o/00000000-0000-0000-0000-000000000001/x", "/o/{id}/x"),
        ("/api/v2/items/5f1a2b3c4d5e6f7a8b9c0d1e", "/api/v2/items/{id}"),
        ("GET /search?q=abc&page=2", "GET /search?q=abc&page={id}"),
        ("/static/app.3f9a2c1b.js", "/static/app.{id}.js"),
        ("/t/eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", "/t/{id}"),
        # no id: the name itself
        ("GET /index.html", "GET /index.html"),
        ("/users/me", "/users/me"),
        ("/api/v2/health", "/api/v2/health"),
        ("hipstershop.CartService/GetCart", "hipstershop.CartService/GetCart"),
        ("SELECT addatabase.aditems", "SELECT addatabase.aditems"),
        ("/deadbeef", "/deadbeef"),  # hex, but no digit: a word
        ("", ""),
    ],
)  # fmt: skip
def test_template(name, want):
    assert template(name) == want
    assert template(want) == want  # a template is its own template


def test_names_differing_only_in_ids_share_a_template():
    names = {f"GET /users/{n}/cart" for n in range(1000)} | {f"GET /users/{n:032x}/cart" for n in range(1000)}
    assert {template(n) for n in names} == {"GET /users/{id}/cart"}
