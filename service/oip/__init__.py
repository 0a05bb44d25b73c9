"""Open Inference Protocol v2 (KServe / Triton): tensors, and the REST and gRPC transports."""
