"""The host toolchain's one error: its message names what is wrong and how to fix it."""

from edgellm.daemon.errors import CommandError


class BuildError(CommandError):
    pass
