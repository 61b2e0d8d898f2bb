"""The `make demo` walkthrough: a sample database and the runbook flows run against it."""
