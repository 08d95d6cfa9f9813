"""End-to-end tests: a real relayd process driven by third-party clients."""
