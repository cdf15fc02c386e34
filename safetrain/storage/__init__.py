"""The workdir's storage: durable JSON-lines files and the workdir lock."""
