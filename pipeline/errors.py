"""The one exception type for mistakes a user can make: its message is shown as is, without a traceback."""


class PipelineError(Exception):
    """A bad input (config, data, reference, handoff): the message says what is wrong and what to do."""
