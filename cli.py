"""What every script's command line shares, kept free of heavy imports (run_all.sh and --status call study.py and
slurm_jobs.py several times, where importing torch would cost ~3 s each): bad input as one line naming the file and
line with exit code 2, never a traceback, and results written whole or not at all."""

import os
import sys
import tempfile
from pathlib import Path


class InputError(Exception):
    """Bad user input. Scripts print it as one line and exit with code 2."""


def one_line(error):
    """The gist of a library's exception, on one line."""
    return " ".join(str(error.args[0] if error.args else type(error).__name__).split())


def exit_on_input_error(main):
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def write_atomic(path, text):
    """Write a whole file or nothing: a killed run never leaves a half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)
