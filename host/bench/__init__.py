"""``vtick bench``: benchmarks that compare against a baseline measured in the same run."""
