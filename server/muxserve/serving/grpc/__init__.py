"""KServe v2 over gRPC (Triton's GRPCInferenceService)."""
