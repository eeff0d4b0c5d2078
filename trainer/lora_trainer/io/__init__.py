"""I/O room: everything the trainer reads from or writes to the outside world's formats.

`storage` (the only module that talks to an object store), `progress` (progress.json for the
operator), `reporting` (log lines and the progress bar), `metadata` (lora-metadata.json).
"""
