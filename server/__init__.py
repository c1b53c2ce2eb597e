"""The featureserve gRPC server: composes the feature store, the model repository and the batcher."""
