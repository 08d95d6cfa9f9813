"""Conformance tests: third-party protocol test suites run against a real relayd process."""
