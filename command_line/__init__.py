"""The programs: thin wrappers that parse, call the library and report."""
