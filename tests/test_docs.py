"""The documentation and release files agree with the package (the site itself is built in .ci/run)."""

import os
import re

import bnseq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as file:
        return file.read()


def test_every_public_name_has_its_reference_entry():
    entries = re.findall(r"(?m)^::: bnseq\.(\w+)$", _read("docs", "api.md"))
    assert sorted(entries) == sorted(bnseq.__all__)  # each once, and nothing that is not public
    assert len(entries) == len(set(entries))


def test_the_changelog_names_this_version_first():
    versions = re.findall(r"(?m)^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", _read("CHANGELOG.md"))
    assert versions[0] == bnseq.__version__
    assert versions == sorted(versions, key=lambda v: tuple(map(int, v.split("."))), reverse=True)


def test_the_readme_is_a_landing_page_whose_links_resolve():
    readme = _read("README.md")
    assert len(readme.splitlines()) <= 300
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10
    for link in local:
        assert os.path.exists(os.path.join(ROOT, link)), link


def test_every_page_is_in_the_site_navigation():
    nav = _read("mkdocs.yml")
    pages = []
    for folder, _, files in os.walk(os.path.join(ROOT, "docs")):
        if os.path.islink(folder) or "notebooks" in folder:
            continue
        pages += [os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, "docs")) for name in files
                  if name.endswith(".md")]
    assert len(pages) >= 12
    for page in pages:
        assert re.search(rf"(?m)^\s+- (.+: )?{re.escape(page)}$", nav), page
    for notebook in sorted(os.listdir(os.path.join(ROOT, "notebooks"))):
        if notebook.endswith(".ipynb"):
            assert f"notebooks/{notebook}" in nav, notebook


def test_the_license_is_the_apache_license():
    text = _read("LICENSE")
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
