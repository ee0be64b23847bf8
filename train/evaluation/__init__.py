"""Full-catalog evaluation: encoding, ranking, the transition prior, the report and the `rectrain eval` recipe."""
