"""Set-up shared by several test modules (tiny systems, fixture files, CLI runs), one kind per module."""
