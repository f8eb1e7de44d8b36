"""The test harness: real daemons on loopback, the container topology, fakes, the demos.

Not product code and not installed with mailwarden (the wheel excludes this package);
tests, benchmarks and ``make demo`` import it from the repository checkout.
"""
