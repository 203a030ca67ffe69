"""What to read: INPUT arguments (files, folders, globs, stdin lists) -> one sorted list of sources."""
