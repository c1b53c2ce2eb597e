"""The featureserve gRPC server: composes the feature store, models and batcher."""
