"""Plan: what a staged plan says (spec: the one parser) and the program it becomes for one input size (schedule)."""
