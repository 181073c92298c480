"""The run's HTML page, built from the files the other commands wrote (never from a model)."""
