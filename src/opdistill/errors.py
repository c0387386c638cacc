"""The one error type users see: a one-line message naming the key, file, line or token at fault."""


class OpdistillError(Exception):
    """A problem with user input (config, data, model paths) reported as one clear line."""
