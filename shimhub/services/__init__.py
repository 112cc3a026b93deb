"""The CRI gRPC services: protobuf in, lifecycle managers, protobuf out."""
