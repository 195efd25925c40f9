"""The `cai` command. Each subcommand is a thin shell over one library module.

Run `cai --help`. User-fixable problems (`CaiError`) print as one line and exit with code 2.
"""

from __future__ import annotations

import sys
from typing import Optional

from cai.cli import setup, data, train, hub  # noqa: F401,I001  (registers the subcommands, in help order)
from cai.cli.common import app
from cai.errors import CaiError


def main(argv: Optional[list[str]] = None) -> None:
    """Exit codes: 0 done, 2 a user error (one line on stderr), 130 interrupted (Ctrl-C).

    Click runs in non-standalone mode so `CaiError` can be printed as one line; in that mode it
    *returns* the code of a `typer.Exit` instead of exiting, and that code must reach the shell.
    """
    import logging

    import click

    # bitsandbytes' CPU backend logs at import, on CPUs with AVX-512 BF16, that it could not fetch
    # an optional kernel from the hub (which cai never reaches at run time): noise on every command.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        code = app(args=argv, standalone_mode=False)
    except CaiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: click prints them and uses exit code 2
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
