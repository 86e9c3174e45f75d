"""One line, not a traceback, for what a user got wrong: a missing or corrupt file, a bad store, a bad option.

    try:
        ...
    except USER_ERRORS as err:
        return user_error("train", err)
"""

from __future__ import annotations

import sys

# what bad input raises: EpisodeStoreError, CheckpointMismatch and bad options are ValueErrors; a missing
# file or an existing run folder an OSError; an unknown task or key a KeyError
USER_ERRORS = (ValueError, KeyError, OSError)


def user_error(command: str, err: BaseException) -> int:
    """Print `dopr COMMAND: error: MESSAGE` on stderr; returns the exit status 2 (a usage error, as argparse's)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
    print(f"dopr {command}: error: {message}", file=sys.stderr)
    return 2
