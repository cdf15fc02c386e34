"""What went wrong and where: the eager instrumented replay of a step, the
diagnosis of a divergence (forensics) and the audit before step 1 (preflight)."""
