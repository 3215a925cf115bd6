"""User errors of a training run and their exit codes.

A user error is something the person launching the run can fix (a flag value, a file, the data, a checkpoint that
does not match). `train/main.py` prints it as one `error: ...` line on rank 0 and exits with the error's code instead
of a traceback (`--debug` or CLIPKIT_DEBUG=1 shows the traceback too). Every rank raises the same error at the same
point (flags are validated before any process group exists; data errors are decided by one all-reduce), so no rank is
left waiting in a collective for one that failed.

Exit codes (also in README "Exit codes"):
    0  the run finished (or stopped at --stop-at)
    1  an unexpected failure (a bug: the traceback is printed)
    2  usage: a bad flag value, an unreadable or malformed config / model file, an unusable path
    3  data: an epoch that yields no optimizer step, no usable samples, more than --max-skip-rate bad samples
    4  non-finite: --max-nonfinite-steps steps in a row had a non-finite loss
    5  checkpoint: --resume refused (missing, incomplete, unsafe, or from a run that differs)
"""

EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_NONFINITE = 4
EXIT_CHECKPOINT = 5


class UserError(Exception):
    """An error the user can fix; `exit_code` says which kind (see the module docstring)."""

    exit_code = EXIT_USAGE


class ConfigError(UserError, ValueError):
    """A bad flag value or config/model file (ValueError too, so library callers can catch it as one)."""

    exit_code = EXIT_USAGE


class DataError(UserError):
    """The training data cannot make progress: no step in an epoch, no usable samples, too many bad samples."""

    exit_code = EXIT_DATA


class NonFiniteError(UserError):
    """Too many consecutive non-finite losses."""

    exit_code = EXIT_NONFINITE


# The old name of the two ways a run stops on its own; kept for callers that catch it.
TrainingStopped = UserError
