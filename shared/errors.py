"""One-line errors for bad input, and the CLI wrapper that prints them."""

from __future__ import annotations

import errno
import functools
import logging
import sys
import warnings
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def quiet_abandoned_reads() -> None:
    """After an error, zarr's abandoned async reads would log or warn at exit; the error line says it all."""
    logging.getLogger("asyncio").disabled = True
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def cli_entry(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI main so user errors and I/O faults end in one line and a non-zero exit."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            quiet_abandoned_reads()
            return 2
        except KeyboardInterrupt:
            print("error: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        except OSError as err:
            hint = {
                errno.ENOSPC: "the disk is full; free space and rerun the same command to resume",
                errno.EDQUOT: "the disk quota is exceeded; free space and rerun the same command to resume",
                errno.EACCES: "permission denied; choose a folder you can write to",
                errno.EPERM: "operation not permitted; choose a folder you can write to",
                errno.EROFS: "the file system is read-only; choose a writable folder",
            }.get(err.errno)
            if hint is None:
                raise
            where = f" ({err.filename})" if err.filename else ""
            print(f"error: {hint}{where}", file=sys.stderr)
            quiet_abandoned_reads()
            return 1

    return wrapped
