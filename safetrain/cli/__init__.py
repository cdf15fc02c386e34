"""The `safetrain` command: training runs, `safetrain report`, `safetrain export`."""
