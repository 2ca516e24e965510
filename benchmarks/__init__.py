"""pocketpeft benchmark suites (run with ``python -m benchmarks.<suite>`` or ``pocketpeft bench``)."""
