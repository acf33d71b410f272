"""Evaluation: QA, perplexity and retrieval metrics, and the approach comparison (`domainlm compare`)."""
