"""The built documentation site: each public name's reference entry shows that object and its signature.

In 0.5.0, `::: bnseq.fold` rendered the *module* bnseq/fold.py (its docstring and
private helpers), eight objects appeared twice, and the strict build did not
notice. This test reads the built API page. It needs a built site: .ci/run builds
it (`mkdocs build --strict`) and runs this test with BNSEQ_SITE set to it; without
BNSEQ_SITE the test skips (the test environment has no mkdocs).
"""

import html
import inspect
import os
import re

import pytest

import bnseq

SITE = os.environ.get("BNSEQ_SITE")
pytestmark = pytest.mark.skipif(not SITE, reason="set BNSEQ_SITE to a built site (mkdocs build) to check it")


@pytest.fixture(scope="module")
def page():
    path = os.path.join(SITE, "api", "index.html")
    assert os.path.exists(path), f"BNSEQ_SITE={SITE!r} holds no built API page ({path})"
    with open(path, encoding="utf-8") as file:
        return file.read()


def _entry(page, name):
    """(kind, heading, signature text) of the reference entry `bnseq.<name>`."""
    headings = re.findall(rf'<h(\d) id="bnseq\.{re.escape(name)}" class="doc doc-heading">', page)
    assert len(headings) == 1, f"bnseq.{name} has {len(headings)} reference entries, not one"
    start = page.index(f'id="bnseq.{name}"')
    kind = re.findall(r'<div class="doc doc-object doc-(\w+)">', page[:start])[-1]
    following = page[start:start + 20000]
    match = re.search(r'<div class="doc-signature highlight">(.*?)</div>', following, re.S)
    nested = re.search(r'<h\d id="bnseq\.', following[10:])
    if match is None or (nested is not None and match.start() > nested.start() + 10):
        return kind, None
    return kind, re.sub(r"\s+", "", html.unescape(re.sub(r"<[^>]+>", "", match.group(1))))


@pytest.mark.parametrize("name", sorted(bnseq.__all__))
def test_each_public_name_has_one_entry_of_its_own_kind_and_signature(page, name):
    obj = getattr(bnseq, name)
    kind, signature = _entry(page, name)
    if inspect.ismodule(obj):
        assert kind == "module"
        return
    if inspect.isfunction(obj):
        assert kind == "function", f"bnseq.{name} renders as a {kind}, not the function"
        expected = re.sub(r"\s+", "", f"{name}{inspect.signature(obj)}")
        assert signature == expected
        return
    assert kind == "class", f"bnseq.{name} renders as a {kind}, not the class"
    if signature is not None:  # a class shows its constructor's parameters
        assert signature.startswith(f"{name}(")
        own = [p for p in inspect.signature(obj).parameters if p not in ("args", "kwargs")]
        assert all(parameter in signature for parameter in own), (signature, own)


def test_no_private_helper_is_documented(page):
    documented = set(re.findall(r'id="(bnseq\.[\w.]+)"', page))
    private = sorted(each for each in documented if any(part.startswith("_") for part in each.split(".")[1:]))
    assert not private, private
