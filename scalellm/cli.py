"""The `scalellm` console command: `scalellm serve [MODEL] [flags]` starts the OpenAI-compatible server."""
from __future__ import annotations

import sys

USAGE = """usage: scalellm serve [MODEL] [flags]   start the OpenAI-compatible server (scalellm serve --help)
       scalellm --version"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        from scalellm import __version__

        print(f"scalellm {__version__}")
        sys.exit(0)
    if not argv or argv[0] != "serve":
        print(USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from scalellm.server.__main__ import main as serve
    from scalellm.server.lifecycle import exit_process

    exit_process(serve(argv[1:], prog="scalellm serve", model_positional=True))


if __name__ == "__main__":
    main()
