"""The docs stay true to the code: the flag tables match the parsers, every relative link points at a file
that exists, and the README stays a front page (the rest lives in docs/)."""
import glob
import os
import re
import subprocess
import sys

from tests.server_utils import ROOT

PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def test_flag_tables_match_the_parsers():
    out = subprocess.run([sys.executable, "tools/flags_doc.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_relative_links_point_at_files():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(page).read()):
            if "://" in target:
                continue
            if not os.path.exists(os.path.join(os.path.dirname(page), target)):
                broken.append(f"{os.path.relpath(page, ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_a_front_page():
    lines = open(PAGES[0]).read().count("\n")
    assert lines <= 220, f"README.md has {lines} lines: move detail into docs/"
