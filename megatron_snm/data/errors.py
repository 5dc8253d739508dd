"""The one exception the data layer raises for bad data: a `.bin`/`.idx` pair that is missing,
truncated or inconsistent, a tokenizer file that cannot be read, a malformed `--split`, an empty
dataset, token ids outside the vocabulary, an output that cannot be written.

Its message names the file (or the flag) and says what is wrong, in one line, so a command-line
tool can print it as it is and exit with status 2. A ValueError, so callers that catch bad
values in general catch it too.
"""


class DataError(ValueError):
    """Bad data or a data file that cannot be used; the message names the file or flag."""
