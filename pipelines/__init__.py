"""PyFlink feature pipelines: Flink SQL windows per entity, written to featureserve over gRPC."""
