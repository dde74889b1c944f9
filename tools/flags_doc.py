"""docs/flags.md from the server's and the gateway's argument parsers, so the page cannot go stale.

    .venv/bin/python tools/flags_doc.py          # rewrite docs/flags.md
    .venv/bin/python tools/flags_doc.py --check  # exit 1 if docs/flags.md differs from the parsers
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "flags.md")


def rows(parser: argparse.ArgumentParser) -> list[str]:
    out = ["| flag | default | meaning |", "|---|---|---|"]
    for action in parser._actions:  # argparse keeps no public list of its arguments
        if isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{n}`" for n in action.option_strings) or f"`{action.metavar or action.dest}`"
        if action.choices:
            names += " " + "\\|".join(str(c) for c in action.choices)
        default = action.default
        shown = "" if default in (None, False, [], argparse.SUPPRESS) else f"`{default}`"
        meaning = " ".join((action.help or "").split()).replace("|", "\\|").replace("%%", "%")
        out.append(f"| {names} | {shown} | {meaning} |")
    return out


def page() -> str:
    from scalellm.gateway.__main__ import build_parser as gateway_parser
    from scalellm.server.__main__ import build_parser as server_parser

    lines = ["# Flags", "",
             "Generated from the argument parsers by `tools/flags_doc.py`; `tests/test_docs.py` fails when this "
             "page and the parsers differ. `--help` prints the same.", "",
             "## Server", "",
             "`scalellm serve [MODEL] [flags]` and `python -m scalellm.server [flags]` take the same flags.", "",
             *rows(server_parser(prog="scalellm serve", model_positional=True)), "",
             "## Gateway", "",
             "`python -m scalellm.gateway [flags] [-- server flags]`: flags after `--` go to the servers `--launch` "
             "starts.", "",
             *rows(gateway_parser()), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    text = page()
    if args.check:
        same = os.path.exists(PAGE) and open(PAGE).read() == text
        print("docs/flags.md is current" if same else "docs/flags.md differs: run tools/flags_doc.py")
        return 0 if same else 1
    with open(PAGE, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(PAGE, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
