"""What happens after a loop: the response to its incidents, the verdict on a
run of failures, the host-side health checks, rollbacks and their budget, the
in-memory snapshots."""
