"""The Apache Beam pipeline of `domainlm data shard`: read -> clean -> dedup -> tokenize -> write."""
