"""domainlm.serve: chunking, embeddings, the vector index, generation and the HTTP server."""
