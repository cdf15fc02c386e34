"""WORKDIR/checkpoints: the store, the files, the repair on start, a
rollback's side state, a workdir written for another model, resuming."""
