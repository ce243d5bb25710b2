"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class DistillError(Exception):
    """A problem with the user's input, named in one line together with its fix."""


class ConfigError(DistillError):
    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config field '{field}' has bad value {value!r}: {allowed}")


def check_choice(field: str, value, allowed) -> None:
    """A ConfigError naming the allowed values unless `value` is one of them."""
    if value not in allowed:
        raise ConfigError(field, value, "allowed: " + ", ".join(str(a) for a in allowed if a))
