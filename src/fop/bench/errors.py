"""The one exception type of the benchmark: bad input the user can fix."""


class BenchError(Exception):
    """Bad input (unknown name, missing or corrupt data, impossible batch size, ...).

    The command line prints the message as one line and exits with status 2, so the message must
    say what is wrong and, where it helps, what to do instead.
    """
