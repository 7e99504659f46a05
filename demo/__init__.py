"""The `make run` demo: a digits classifier protected, licensed and served end to end."""
