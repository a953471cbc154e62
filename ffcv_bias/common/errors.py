"""One family of user-facing errors, the exit codes, and the CLI wrapper that reports them.

A UserError is a problem the user can fix or must know about (a bad flag, a missing file,
a refused run directory), told in one line that names it. Every command reports one the
same way, `error: <message>` on stderr and no traceback, and exits with the error's
`exit_code`. Anything else is a bug and keeps its traceback.
"""
import argparse
import functools
import sys

EXIT_OK = 0
EXIT_FAILURE = 1     # the work was attempted and failed (a run, a training job, a full disk)
EXIT_USAGE = 2       # bad input: the command, its config or its files; nothing was done
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal (SLURM preemption); rerun resumes
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


class UserError(Exception):
    """A one-line problem for the user; a CLI exits with `exit_code`."""
    exit_code = EXIT_USAGE


def report(error, exit_code):
    """Print `error: <error>` on stderr; returns `exit_code` for the caller to exit with."""
    print(f"error: {error}", file=sys.stderr)
    return exit_code


def main_guard(*usage_errors, failures=(), interrupted="interrupted"):
    """Decorator for a CLI's `main(argv=None)`: a UserError raised inside becomes
    `error: <message>` and the error's exit_code. Classes outside the family (ffcv's,
    the loaders') are named here: `usage_errors` exit EXIT_USAGE, `failures` EXIT_FAILURE.
    Ctrl-C (KeyboardInterrupt) prints `error: <interrupted>` (say what is kept and how to
    go on) and exits EXIT_INTERRUPTED; the atomic writers have removed their temporaries
    by then."""
    def decorate(main):
        @functools.wraps(main)
        def guarded(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UserError as error:
                return report(error, error.exit_code)
            except usage_errors as error:
                return report(error, EXIT_USAGE)
            except failures as error:
                return report(error, EXIT_FAILURE)
            except KeyboardInterrupt:
                sys.stdout.flush()
                return report(interrupted, EXIT_INTERRUPTED)
        return guarded
    return decorate


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line like every other bad input: argparse prints its
    whole usage block before `PROG: error: MESSAGE`; this prints `error: MESSAGE (PROG
    --help lists the options)` alone and exits EXIT_USAGE (SystemExit, as argparse does).
    Subcommands made with add_subparsers inherit the class."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} ({self.prog} --help lists the options)\n")
