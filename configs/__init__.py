"""The YAML configs shipped with domainlm (model sizes, stage configs, pipelines); data, not code."""
