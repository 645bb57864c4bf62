"""Flower baseline of fedward's round bench (scripts/bench.sh round --baseline flower)."""
