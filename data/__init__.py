"""The data stage: corpus readers' pydoc corpus, the Apache Beam shard pipeline and the shards-dir contract."""
