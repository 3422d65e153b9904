"""The gRPC side: the Open Inference Protocol's GRPCInferenceService (VAE_GRPC_PORT), an adapter
onto the same v2 models, ModelHandle, limits and metrics as the HTTP side; never imports torch."""
