"""The one base class of the errors a user can act on: a bad setting, data file, checkpoint or tokenizer.

`scratchllm/__main__.py` prints such an error as one line and exits with code 2 (no traceback unless `--debug`);
any other exception is a bug and keeps its traceback. Each subclass lives beside the code that raises it.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user supplied is wrong; the message says what, where (flag, file:line, path) and the fix."""
