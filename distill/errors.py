"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class DistillError(Exception):
    """A problem with the user's input, named in one line together with its fix."""


class ConfigError(DistillError):
    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config field '{field}' has bad value {value!r}: {allowed}")
