"""Project tooling that is not a pipeline stage (plots template, UI check)."""
