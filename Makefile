# Developer shortcuts. Installing and testing are in README.md.

GRPC_PROTOS := proto/shimhub_proto/cri/v1/api.proto
# Schemas spoken over ttrpc to containerd shims: messages only, no gRPC stubs.
TTRPC_PROTOS := $(wildcard proto/shimhub_proto/ttrpc/*.proto proto/shimhub_proto/nri/*.proto proto/shimhub_proto/containerd/*/*.proto proto/shimhub_proto/containerd/*/*/*.proto)

.PHONY: proto lint
proto:  ## regenerate the Python stubs after editing a .proto file
	python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(GRPC_PROTOS)
	python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto $(TTRPC_PROTOS)

lint:
	ruff check . && ruff format --check shimhub tests plugins bench
