"""What a run writes for people: incidents, quarantine, the loop records,
TensorBoard, the terminal and log.txt, and the report."""
