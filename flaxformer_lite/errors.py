"""The one exception type for mistakes a user can make (config, flags, files, workdir).

`launch.py` turns a `UserError` into one line on stderr and exit status 2; anything
else is a bug and keeps its traceback. Leaf modules (`models/`, `tasks/`) may import
this file: it depends on nothing.
"""


class UserError(Exception):
    """A mistake the user can fix. The message names the field and the fix."""


class ConfigError(UserError):
    """A config value that cannot work (raised before anything is written)."""
